"""`memmit eval` and `memmit compare` on a tiny real pipeline and real digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memmit.cli import main
from memmit.config import EvalConfig
from memmit.data.dataset import load_train_dataset, source_names
from memmit.data.features import load_extractor
from memmit.eval.report import evaluate, rescore
from memmit.data.feature_store import store_for
from memmit.eval.sampling import TrainingEmbeddings, TrainingPixels, from_uint8, load_train_images, to_uint8
from memmit.eval.scores import score_samples
from memmit.eval.tables import compare_rows, format_compare, format_report
from memmit.families.base import load_pipeline
from memmit.families.unconditional import UnconditionalTask

# The brief's extractor format is TorchScript, which torch 2.13 marks deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]


def eval_flags(pipe, data, out, *extra) -> list[str]:
    return ["eval", "--pretrained_model_name_or_path", pipe, "--dataset_name", data, "--output_dir", str(out),
            "--num_samples", "8", "--num_inference_steps", "3", "--batch_size", "4", *map(str, extra)]


class TinyEncoder(torch.nn.Module):
    """A fixed random conv embedding: enough to exercise a user-supplied TorchScript extractor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 6, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels averaged: grey and RGB training sets alike; + 0.1: never an all-zero embedding.
        return self.conv(x.mean(1, keepdim=True)).relu().mean(dim=(2, 3)) + 0.1


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("extractor") / "encoder.pt"
    torch.jit.script(TinyEncoder()).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def digits(tiny_pipeline, digits_dir):
    """The 24 training digits as the evaluator loads them ([-1, 1], centre-cropped) and their names."""
    task = UnconditionalTask(load_pipeline(tiny_pipeline), center_crop=True)
    ds = load_train_dataset(dataset_name=digits_dir)
    return load_train_images(ds, "image", task.transform, show_progress=False), source_names(ds, "image")


def test_eval_end_to_end_with_feature_extractor(tiny_pipeline, digits_dir, encoder_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(eval_flags(tiny_pipeline, digits_dir, out, "--feature_extractor", encoder_file, "--k", 5)) == 0
    printed = capsys.readouterr().out
    assert "memorized, d1/d2 < 0.333" in printed and "cosine (torchscript)" in printed

    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"settings", "versions", "pixel", "features", "quality", "files"}
    assert report["settings"]["resolution"] == 16 and report["settings"]["sampler"] == "DDIM"
    assert set(report["versions"]) == {"torch", "diffusers", "memmit"}
    pixel = report["pixel"]
    assert (pixel["num_samples"], pixel["num_train"], pixel["k"]) == (8, 24, 5)
    assert 0 <= pixel["fraction_memorized_ratio"] <= 1
    assert list(pixel["fraction_memorized_by_score"]) == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    by_score = list(pixel["fraction_memorized_by_score"].values())
    assert by_score == sorted(by_score) and all(0 <= v <= 1 for v in by_score)
    per_sample = pixel["per_sample"]
    assert all(len(v) == 8 for v in per_sample.values())
    assert all(0 <= r <= 1 for r in per_sample["ratio"]) and all(0 <= i < 24 for i in per_sample["nearest_index"])

    features = report["features"]
    assert features["extractor"] == {"kind": "torchscript", "path": encoder_file}
    assert -1 <= features["cosine"]["mean"] <= features["cosine"]["p95"] <= 1
    assert 0 <= features["cosine"]["frac_above_0_5"] <= 1
    # torch-fidelity's Inception weights cannot be fetched offline: the report says so instead of failing.
    quality = report["quality"]
    assert quality["extractor"]["kind"] == "inception-v3"
    assert quality["available"] or quality["reason"]

    samples = np.load(out / "samples.npy")
    assert samples.shape == (8, 16, 16, 1) and samples.dtype == np.uint8 and samples.std() > 0
    with Image.open(out / "most_copied.png") as fig:
        assert fig.width >= 4 * 2 * 64 and fig.height >= 2 * 64  # 8 pairs, digits upscaled 4x


def test_extractor_embeddings_of_the_training_set_are_stored(tiny_pipeline, digits_dir, digits, encoder_file,
                                                              tmp_path, monkeypatch):
    """--feature_extractor's and --quality_extractor's embeddings of the training set are features of the store
    (computed by every process, on disk, read again by a later evaluation), and score as in-memory ones."""
    monkeypatch.setenv("MEMMIT_CACHE", str(tmp_path / "cache"))  # the test alters the store below
    out = tmp_path / "out"
    report = evaluate(EvalConfig(pretrained_model_name_or_path=tiny_pipeline, output_dir=str(out),
                                 dataset_name=digits_dir, num_samples=4, num_inference_steps=2, batch_size=4, k=5,
                                 feature_extractor=encoder_file, quality_extractor=encoder_file), show_progress=False)
    train, sources = digits
    encoder = load_extractor(encoder_file, torch.device("cpu"), (train[:2] + 1) / 2, "quality_extractor")
    task = UnconditionalTask(load_pipeline(tiny_pipeline), center_crop=True)
    ds = load_train_dataset(dataset_name=digits_dir)
    # One store serves both roles (the same model); its rows are the encoder's embeddings of the training pixels.
    store = store_for(TrainingEmbeddings(TrainingPixels(task.transform), encoder, 4), ds, "image", None, False)
    assert store.missing() == [] and store.fingerprint["detector"]["kind"] == "training embeddings"
    torch.testing.assert_close(store.read(), encoder((train + 1) / 2, 4))
    in_memory = score_samples(from_uint8(np.load(out / "samples.npy")), train, sources, k=5,
                              clusters=report["pixel"]["clusters"]["groups"], feature_extractor=encoder,
                              quality_extractor=encoder)
    assert report["features"]["cosine"] == pytest.approx(in_memory["features"]["cosine"])
    assert report["quality"]["frechet_distance"] == pytest.approx(in_memory["quality"]["frechet_distance"])
    # A later evaluation reads the stored embeddings rather than embedding the training set again: its Frechet
    # distance is the one against the rows now on disk.
    stored = np.random.RandomState(0).rand(len(ds), 6).astype(np.float32)
    np.save(store.chunk(0), stored)
    expected = score_samples(from_uint8(np.load(out / "samples.npy")), train, sources, k=5,
                             clusters=report["pixel"]["clusters"]["groups"], quality_extractor=encoder,
                             train_embeddings={"quality_extractor": torch.from_numpy(stored)})["quality"]
    assert expected["frechet_distance"] != pytest.approx(report["quality"]["frechet_distance"])
    assert rescore(out)["quality"]["frechet_distance"] == pytest.approx(expected["frechet_distance"])


def test_saved_samples_rescore_to_the_same_report(tiny_pipeline, digits_dir, digits, tmp_path):
    out = tmp_path / "out"
    report = evaluate(EvalConfig(pretrained_model_name_or_path=tiny_pipeline, output_dir=str(out),
                                 dataset_name=digits_dir, num_samples=4, num_inference_steps=2, batch_size=4, k=5),
                      show_progress=False)
    train, sources = digits
    clusters = report["pixel"]["clusters"]
    rescored = score_samples(from_uint8(np.load(out / "samples.npy")), train, sources, k=5,
                             clusters=clusters["groups"], detector=clusters["detector"])
    assert rescored["pixel"] == report["pixel"]
    again = rescore(out)  # the saved samples, read back from disk: no sampling
    assert again["pixel"] == report["pixel"] and again["settings"] == report["settings"]
    # A report written before an option existed rescores with that option's default.
    old = json.loads((out / "report.json").read_text())
    del old["settings"]["caption_column"]
    (out / "report.json").write_text(json.dumps(old))
    assert rescore(out)["pixel"] == report["pixel"]


def test_exact_copies_are_all_memorized(digits, encoder_file):
    train, sources = digits
    copies = train[[3, 3, 7, 0, 12, 3]]
    quality = load_extractor(encoder_file, torch.device("cpu"), (train[:2] + 1) / 2, "quality_extractor")
    report = score_samples(copies, train, sources, k=50, feature_extractor=quality, quality_extractor=quality)
    pixel = report["pixel"]
    assert pixel["fraction_memorized_ratio"] == 1.0
    assert all(v == 1.0 for v in pixel["fraction_memorized_by_score"].values())
    assert pixel["per_sample"]["nearest_index"] == [3, 3, 7, 0, 12, 3]
    assert pixel["most_copied"][0] == {"index": 3, "source": sources[3], "count": 3}
    assert report["features"]["cosine"]["frac_above_0_5"] == 1.0
    assert report["quality"]["available"] and report["quality"]["frechet_distance"] >= 0
    assert "100.0%" in format_report(report)


def test_transformers_image_encoder_as_feature_extractor(digits, tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = tmp_path / "vit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=16, patch_size=4)).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    train, sources = digits
    # A 3-channel encoder on 1-channel digits: the evaluator repeats the grey channel.
    vit = load_extractor(str(path), torch.device("cpu"), (train[:2] + 1) / 2, "feature_extractor")
    report = score_samples(train[:4], train, sources, k=5, feature_extractor=vit)
    assert report["features"]["extractor"] == {"kind": "transformers", "path": str(path), "class": "ViTModel"}
    assert report["features"]["per_sample"]["nearest_index"] == [0, 1, 2, 3]
    assert report["features"]["cosine"]["frac_above_0_5"] == 1.0


def test_uint8_round_trip_is_exact_on_training_pixels(digits):
    train, _ = digits
    assert torch.equal(from_uint8(to_uint8((train + 1) / 2)), train)


def test_resolution_and_train_data_dir(tiny_pipeline, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for i in range(4):
        Image.fromarray(rng.randint(0, 256, (20, 24, 3)).astype(np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    assert main(["eval", "--pretrained_model_name_or_path", tiny_pipeline, "--train_data_dir", str(folder),
                 "--resolution", "8", "--num_samples", "2", "--num_inference_steps", "2",
                 "--output_dir", str(out)]) == 0
    assert np.load(out / "samples.npy").shape == (2, 8, 8, 1)
    report = json.loads((out / "report.json").read_text())
    assert report["pixel"]["num_train"] == 4 and report["features"] is None
    assert {c["source"] for c in report["pixel"]["most_copied"]} <= {str(folder / f"{i}.png") for i in range(4)}


def test_bad_input_exits_2_before_sampling(tiny_pipeline, digits_dir, tmp_path, capsys):
    not_a_module = tmp_path / "not_torchscript.pt"
    not_a_module.write_text("hello")
    cases = [
        (["--pretrained_model_name_or_path", str(tmp_path / "nope"), "--dataset_name", digits_dir],
         f"pretrained_model_name_or_path {str(tmp_path / 'nope')!r} does not exist"),
        (["--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name", digits_dir, "--image_column", "img"],
         "image_column 'img' not in dataset columns ['image', 'label']"),
        (["--pretrained_model_name_or_path", tiny_pipeline], "give exactly one of dataset_name or train_data_dir"),
        (["--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name", digits_dir, "--resolution", "9"],
         "resolution 9 must be a multiple of 2"),
        (["--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name", digits_dir,
          "--feature_extractor", str(not_a_module)], "as a TorchScript module"),
        (["--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name", digits_dir, "--k", "1"],
         "k must be >= 2"),
        (["--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name", digits_dir, "--threshold", "0"],
         "threshold must be in (0, 1]"),
        (["--dataset_name", digits_dir], "pretrained_model_name_or_path is required"),
    ]
    for flags, message in cases:
        out = tmp_path / "out"
        assert main(["eval", *flags, "--output_dir", str(out)]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("memmit: error:") == 1, (flags, err)
        assert not out.exists()


def test_options_come_from_yaml_and_flags_and_help_names_the_required_ones(tiny_pipeline, digits_dir, tmp_path,
                                                                           capsys):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"pretrained_model_name_or_path: {tiny_pipeline}\ndataset_name: {digits_dir}\nk: 1\n")
    out = tmp_path / "out"
    assert main(["eval", "--config", str(recipe), "--output_dir", str(out)]) == 2  # k: 1 from the file
    assert "memmit: error: k must be >= 2" in capsys.readouterr().err
    assert main(["eval", "--config", str(recipe), "--k", "5", "--num_samples", "2", "--num_inference_steps", "1",
                 "--resolution", "none", "--output_dir", str(out)]) == 0  # flags win
    assert json.loads((out / "report.json").read_text())["pixel"]["k"] == 5

    recipe.write_text("num_sample: 4\n")
    assert main(["eval", "--config", str(recipe), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) ['num_sample']" in err and "num_samples" in err
    assert main(["eval", "--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name", digits_dir]) == 2
    assert "memmit: error: output_dir is required" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())
    assert usage.startswith("usage: memmit eval") and "most_copied.png go. (required)" in usage
    assert "Images to sample. (default: 256)" in usage


def test_extractor_that_rejects_the_images_fails_before_sampling(tiny_pipeline, digits_dir, tmp_path, capsys):
    rgb_only = tmp_path / "rgb.pt"
    torch.jit.trace(torch.nn.Conv2d(3, 4, 3), torch.zeros(1, 3, 16, 16)).save(str(rgb_only))
    flags = eval_flags(tiny_pipeline, digits_dir, tmp_path / "out", "--quality_extractor", rgb_only)
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert f"quality_extractor {str(rgb_only)!r} failed on images of shape (2, 1, 16, 16)" in err


def test_compare_prints_both_and_draws(tmp_path, capsys, digits):
    train, sources = digits
    dirs = []
    for name, samples in [("baseline", train[:6]), ("memmit", train[:6] * 0.5)]:
        report = score_samples(samples, train, sources, k=5)
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        dirs.append(tmp_path / name)
    assert main(["compare", str(dirs[0] / "report.json"), str(dirs[1])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["baseline", "100.0"] and lines[2].startswith("memmit")
    with Image.open(dirs[0] / "compare.png") as fig:
        assert fig.size[0] > 400

    figure = tmp_path / "custom.png"
    assert main(["compare", str(dirs[0]), str(dirs[1]), "--labels", "before", "after", "--output", str(figure)]) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and figure.is_file()

    assert main(["compare", str(dirs[0]), "--labels", "a", "b"]) == 2
    assert "got 2 labels for 1 reports" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing.json")]) == 2
    assert "cannot read report" in capsys.readouterr().err


def test_module_entry_point_exits_2_on_a_missing_pipeline(tmp_path, digits_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "memmit.cli", "eval", "--pretrained_model_name_or_path",
                           str(tmp_path / "nope"), "--dataset_name", digits_dir, "--output_dir", str(tmp_path / "out")],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"memmit: error: pretrained_model_name_or_path {str(tmp_path / 'nope')!r} "
                                        "does not exist")


def test_quality_reference_is_one_image_per_near_duplicate_family(digits, encoder_file):
    """Duplicated training images, exact or near, must not make copying them look like good quality."""
    train, sources = digits
    distinct = train[:10]
    near_copies = (distinct[:1] + 0.01 * torch.randn(10, *distinct.shape[1:], generator=torch.Generator().manual_seed(0)))
    quality = load_extractor(encoder_file, torch.device("cpu"), (train[:2] + 1) / 2, "quality_extractor")
    exact = score_samples(distinct, torch.cat([distinct, distinct[:1].repeat(10, 1, 1, 1)]), sources[:20], k=5,
                          quality_extractor=quality)["quality"]
    near = score_samples(distinct, torch.cat([distinct, near_copies.clamp(-1, 1)]), sources[:20], k=5,
                         clusters=[[0, *range(10, 20)]], detector={"features": "given"}, quality_extractor=quality)
    for report in (exact, near["quality"]):
        assert report["frechet_distance"] == pytest.approx(0.0, abs=1e-3)
        assert report["reference"] == "one of each of 10 near-duplicate families and lone images, of 20 training images"


def test_eval_text_to_image_with_seeded_training_captions(tiny_sd_pipeline, captioned_digits_dir, tmp_path, capsys):
    import datasets

    out = tmp_path / "sd"
    flags = ["--pretrained_model_name_or_path", tiny_sd_pipeline, "--dataset_name", captioned_digits_dir,
             "--num_samples", "4", "--num_inference_steps", "2", "--batch_size", "2", "--k", "5",
             "--output_dir", str(out)]
    assert main(["eval", *flags]) == 2  # a text-to-image pipeline needs its captions
    assert "caption_column is required" in capsys.readouterr().err
    assert main(["eval", *flags, "--caption_column", "captions"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["pipeline"] == "StableDiffusionPipeline"
    assert np.load(out / "samples.npy").shape == (4, 16, 16, 3)
    prompts = json.loads((out / "prompts.json").read_text())
    captions = {c for row in datasets.load_from_disk(captioned_digits_dir)["captions"] for c in row}
    assert len(prompts) == 4 and set(prompts) <= captions and report["files"]["prompts"] == "prompts.json"
    assert rescore(out)["pixel"] == report["pixel"]  # prompts and samples saved: the report is recomputable


class TinyClassifier(torch.nn.Module):
    """10 class logits from 3-channel images: a fixed random linear map of 4x4-pooled pixels."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(48, 10)
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_text_to_image_eval_reports_duplicated_prompts_apart_and_alignment(tiny_sd_pipeline, tmp_path, capsys):
    import datasets

    from conftest import mnist_images

    images, _ = mnist_images(12)
    captions = [f"a handwritten {DIGIT_WORDS[i % 10]}, sample {i}" for i in range(12)]
    captions[5] = captions[6] = "a handwritten one or seven"  # names two classes: not counted for alignment
    data = tmp_path / "data"
    # The first two digits with their captions three more times each: duplicated captions.
    datasets.Dataset.from_dict({"image": images + images[:2] * 3, "text": captions + captions[:2] * 3}).save_to_disk(data)
    classifier = tmp_path / "classifier.pt"
    torch.jit.script(TinyClassifier()).save(str(classifier))
    out = tmp_path / "out"
    assert main(["eval", "--pretrained_model_name_or_path", tiny_sd_pipeline, "--dataset_name", str(data),
                 "--caption_column", "text", "--num_samples", "40", "--num_inference_steps", "2", "--batch_size", "8",
                 "--k", "5", "--alignment_classifier", str(classifier), "--class_names", *DIGIT_WORDS,
                 "--output_dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    prompts = json.loads((out / "prompts.json").read_text())
    memorized = report["pixel"]["per_sample"]["memorized"]
    duplicated = {captions[0], captions[1], captions[5]}  # rows 5 and 6 share theirs too
    for name, ids in (("duplicated", [i for i, q in enumerate(prompts) if q in duplicated]),
                      ("other", [i for i, q in enumerate(prompts) if q not in duplicated])):
        assert report["prompts"][name]["num_samples"] == len(ids) > 0
        assert report["prompts"][name]["fraction_memorized_ratio"] == pytest.approx(
            sum(memorized[i] for i in ids) / len(ids))
    # Alignment written out: the classifier on the saved samples, against the digit word of each prompt.
    named = {q: next((c for c, w in enumerate(DIGIT_WORDS) if f" {w}," in q), None) for q in prompts}
    counted = [i for i, q in enumerate(prompts) if named[q] is not None]
    with torch.no_grad():
        logits = torch.jit.load(str(classifier))(torch.from_numpy(np.load(out / "samples.npy")).permute(0, 3, 1, 2)
                                                 .float() / 255)
    aligned = report["prompts"]["alignment"]
    assert aligned["num_samples_naming_one_class"] == len(counted) < len(prompts)
    assert aligned["fraction_aligned"] == pytest.approx(
        sum(int(logits[i].argmax()) == named[prompts[i]] for i in counted) / len(counted))
    for name, group in (("duplicated", [i for i in counted if prompts[i] in duplicated]),
                        ("other", [i for i in counted if prompts[i] not in duplicated])):
        assert group and aligned[f"fraction_aligned_{name}"] == pytest.approx(
            sum(int(logits[i].argmax()) == named[prompts[i]] for i in group) / len(group))
    printed = capsys.readouterr().out
    assert "for duplicated captions as prompts" in printed and "prompt alignment" in printed
    table = format_compare(compare_rows([report], ["sd"]))
    assert "dup. prompts mem." in table and "other prompts mem." in table and "aligned, other prompts" in table
    assert f"{100 * report['prompts']['other']['fraction_memorized_ratio']:.1f}%" in table.splitlines()[1]


@pytest.mark.parametrize("extra, message", [
    (["--class_names", "a", "b"], "alignment_classifier and class_names go together"),
    (["--alignment_classifier", "CLASSIFIER", "--class_names", "a", "b"], "scores 10 classes, and class_names names 2"),
])
def test_bad_alignment_options_are_named(tiny_sd_pipeline, captioned_digits_dir, tmp_path, capsys, extra, message):
    classifier = tmp_path / "classifier.pt"
    torch.jit.script(TinyClassifier()).save(str(classifier))
    extra = [str(classifier) if a == "CLASSIFIER" else a for a in extra]
    assert main(["eval", "--pretrained_model_name_or_path", tiny_sd_pipeline, "--dataset_name", captioned_digits_dir,
                 "--caption_column", "text", "--output_dir", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
