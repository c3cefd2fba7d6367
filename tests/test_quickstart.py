"""The quickstart's steps, reduced to tiny sizes, so a broken `make quickstart` fails CI."""

import json

import pytest
from PIL import Image

from memmit.quickstart import main


@pytest.mark.slow  # ~80 s: make quickstart's whole path, reduced
def test_quickstart_reduced(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "qs"
    argv = ["--output_dir", str(out), "--pretrain_steps", "4", "--num_unique", "16", "--copies", "4",
            "--num_rounds", "1", "--num_samples", "8", "--num_inference_steps", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for label in ("pretrained", "memmit", "paper", "plain"):
        assert label in printed
        assert (out / "eval" / label / "report.json").is_file()
    rows = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in rows] == ["pretrained", "memmit", "paper", "plain"]
    for r in rows:
        assert 0 <= r["copies_of_duplicated"] + r["copies_of_unique"] <= 1
        assert r["frechet"] is not None and r["frechet"] >= 0
    # memmit ran AGC (skip fractions recorded); the plain arm has AGC off, so it has none.
    assert rows[1]["skip_duplicated"] is not None and rows[3]["skip_duplicated"] is None
    assert all(r["frechet_held_out"] > 0 for r in rows)
    # memmit's default trains on one copy of each duplicated digit; the paper and plain arms on all.
    dup = json.loads((out / "memmit" / "memmit" / "duplicates.json").read_text())
    assert dup["num_clusters"] == 8 and dup["largest_cluster"] == 4
    Image.open(out / "compare.png").verify()

    # A second run reuses the cached data, classifier and pretrained pipeline.
    assert main(argv) == 0
    assert "using the cached pretrained pipeline" in capsys.readouterr().out


@pytest.mark.slow  # 40 s: the MNIST quickstart above, on the other digit set
def test_quickstart_on_sklearn_digits(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "qs"
    assert main(["--digits", "sklearn_digits", "--output_dir", str(out), "--pretrain_steps", "4", "--num_unique", "16",
                 "--copies", "4", "--num_rounds", "1", "--num_samples", "8", "--num_inference_steps", "2"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in rows] == ["pretrained", "memmit", "paper", "plain"]
    assert (out / "data-sklearn_digits-u16-r4").is_dir() and (out / "data-sklearn_digits-u16-r4-features.pt").is_file()
    dup = json.loads((out / "memmit" / "memmit" / "duplicates.json").read_text())
    assert dup["num_clusters"] == 8 and dup["largest_cluster"] == 4

def test_sklearn_digit_set_builds_with_known_duplicates_and_a_classifier(tmp_path):
    import datasets
    import numpy as np
    import torch

    from memmit.testbeds.digits import build_dataset, build_digit_features, data_dir, digit_arrays, features_file

    x, y = digit_arrays("sklearn_digits")
    assert x.shape == (1797, 8, 8) and x.dtype == np.uint8 and x.max() == 255 and set(y.tolist()) == set(range(10))
    data = build_dataset(data_dir(tmp_path, "sklearn_digits", 20, 3), "sklearn_digits", num_unique=20, copies=3)
    assert data.name == "data-sklearn_digits-u20-r3"
    ds = datasets.load_from_disk(str(data))
    assert len(ds) == 20 + 8 * 3 and sum(ds["is_duplicate"]) == 24 and ds[0]["image"].size == (16, 16)
    # Each row is its digit, bilinearly upscaled, with its label; the copies are the same picture.
    for row in (0, 20, 20 + 8):
        digit = ds["digit_id"][row]
        expected = Image.fromarray(x[digit], "L").resize((16, 16), Image.BILINEAR)
        assert np.array_equal(np.asarray(ds[row]["image"]), np.asarray(expected)) and ds["label"][row] == int(y[digit])
    assert ds["digit_id"][20] == ds["digit_id"][28] and ds["is_duplicate"][20] and not ds["is_duplicate"][0]
    features = torch.jit.load(str(build_digit_features(features_file(data), data, "sklearn_digits", epochs=1)))
    assert features(torch.zeros(2, 1, 16, 16)).shape == (2, 64)


def test_shifted_copies_are_the_digit_moved_by_at_most_the_shift(tmp_path):
    import datasets
    import numpy as np

    from memmit.testbeds.digits import build_dataset, data_dir

    plain = datasets.load_from_disk(str(build_dataset(data_dir(tmp_path, "mnist", 10, 6), "mnist", num_unique=10,
                                                      copies=6)))
    path = build_dataset(data_dir(tmp_path, "mnist", 10, 6, shift=1), "mnist", num_unique=10, copies=6, shift=1)
    assert path.name == "data-u10-r6-s1"
    shifted = datasets.load_from_disk(str(path))
    assert shifted["digit_id"] == plain["digit_id"] and shifted["is_duplicate"] == plain["is_duplicate"]
    moves = set()
    for row in range(len(plain)):
        a, b = np.asarray(plain[row]["image"]), np.asarray(shifted[row]["image"])
        found = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if np.array_equal(np.roll(a, (dy, dx), (0, 1)), b)]
        assert found, row
        if row < 10 + 8:  # unique digits and each duplicated digit's first copy stay where they are
            assert (0, 0) in found
        moves.update(found)
    assert len(moves) > 3  # the copies really move, in several directions


@pytest.mark.slow  # ~60 s: the text-to-image testbed's whole path, reduced
def test_text_to_image_testbed_reduced(tmp_path, capsys, monkeypatch):
    import datasets
    from diffusers import StableDiffusionPipeline

    from memmit.testbeds.text_to_image import DIGIT_WORDS

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "t2i"
    assert main(["--task", "text-to-image", "--output_dir", str(out), "--pretrain_steps", "4", "--num_unique", "16",
                 "--copies", "4", "--vae_steps", "10", "--num_rounds", "1", "--num_samples", "8",
                 "--num_inference_steps", "2"]) == 0
    printed = capsys.readouterr().out
    ds = datasets.load_from_disk(str(out / "data-t2i-u16-r4"))
    # Unique digits have captions of their own; each duplicated digit's 4 copies share one.
    by_digit = {}
    for digit, text, label in zip(ds["digit_id"], ds["text"], ds["label"]):
        by_digit.setdefault(digit, set()).add(text)
        assert text.startswith(f"a handwritten {DIGIT_WORDS[label]}, ")
    assert len(by_digit) == 24 and all(len(texts) == 1 for texts in by_digit.values())
    assert len(set(ds["text"])) == 24
    pipe = StableDiffusionPipeline.from_pretrained(out / "pretrained-data-t2i-u16-r4-4steps")
    assert all(len(pipe.tokenizer.tokenize(word)) == 1 for text in ds["text"] for word in text.replace(",", "").split())
    image = pipe(ds["text"][0], num_inference_steps=2, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 1)
    assert json.loads((out / "init-data-t2i-u16-r4" / "vae.json").read_text())["psnr_held_out_db"] > 0
    for label in ("pretrained", "memmit", "paper", "plain"):
        report = json.loads((out / "eval" / label / "report.json").read_text())
        prompts = report["prompts"]
        assert prompts["duplicated"]["num_samples"] + prompts["other"]["num_samples"] == 8
        assert prompts["alignment"]["num_samples_naming_one_class"] == 8
        assert any(line.startswith(label) for line in printed.splitlines())
    dup = json.loads((out / "memmit" / "memmit" / "duplicates.json").read_text())
    assert dup["num_clusters"] == 8 and dup["largest_cluster"] == 4
    # The default anchors each duplicated caption to 4 captions of unique digits.
    duplicated = {t for t, d in zip(ds["text"], ds["is_duplicate"]) if d}
    assert dup["anchored_captions"] and all(a["caption"] in duplicated and a["copies"] == 4 and len(a["anchors"]) == 4
                                            and not duplicated & set(a["anchors"]) for a in dup["anchored_captions"])
    Image.open(out / "compare.png").verify()


@pytest.mark.slow
def test_text_to_image_testbed_with_an_sd3_transformer_reduced(tmp_path, monkeypatch):
    """`--family sd3`: the same testbed with an SD3 transformer trained by rectified flow, end to end."""
    from diffusers import StableDiffusion3Pipeline

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "t2i"
    assert main(["--task", "text-to-image", "--family", "sd3", "--output_dir", str(out), "--pretrain_steps", "4",
                 "--num_unique", "16", "--copies", "4", "--vae_steps", "10", "--num_rounds", "1", "--num_samples", "8",
                 "--num_inference_steps", "2"]) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "pretrained-data-t2i-u16-r4-4steps-sd3")
    assert all(len(pipe.tokenizer_3.tokenize(" " + word)) == 1 for word in ["handwritten", "seven", "slanted"])
    for label in ("pretrained", "memmit", "paper", "plain"):
        report = json.loads((out / "eval" / label / "report.json").read_text())
        assert report["settings"]["pipeline"] == "StableDiffusion3Pipeline"
        assert report["settings"]["sampler"] == "FlowMatchEulerDiscrete"


@pytest.mark.slow  # ~90 s: forget mode's quickstart, reduced
def test_forget_quickstart_reduced(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "forget"
    # A threshold of 2 (the pixel distance's maximum) makes every prompt's renders collapse: all 8 reproduce.
    assert main(["--task", "forget", "--output_dir", str(out), "--pretrain_steps", "4", "--num_unique", "16",
                 "--copies", "4", "--vae_steps", "10", "--num_rounds", "1", "--num_samples", "8",
                 "--num_inference_steps", "2", "--forget_threshold", "2"]) == 0
    printed = capsys.readouterr().out
    prompts = (out / "forget-prompts.txt").read_text().split("\n")[:-1]
    assert len(prompts) == 8 and len(set(prompts)) == 8
    split = json.loads((out / "forget" / "memmit" / "forget" / "forget.json").read_text())
    assert [p["prompt"] for p in split["prompts"]] == prompts and all(p["reproduces"] for p in split["prompts"])
    assert (out / "forget" / "memmit" / "forget" / "verify.json").is_file()
    assert not (out / "forget" / "memmit" / "duplicates.json").exists()  # no training image reached the run
    for label in ("pretrained", "forget"):
        assert any(line.startswith(label) for line in printed.splitlines())
    Image.open(out / "compare.png").verify()
