"""Nothing silently wrong: the input model is never written, a used output folder is never mixed with a new run,
options on a pipeline they cannot act on are refused by name, and caches that cannot be written or a Hub that
cannot be asked are said so, all before any work."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from memmit.cli import train_main
from memmit.config import TEXT_TO_IMAGE_OPTIONS, EvalConfig, MemmitConfig
from memmit.families import load_task
from memmit.families.base import load_pipeline

from test_train import args


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags", [[], ["--overwrite_output_dir"], ["--resume_from_checkpoint", "latest"],
                                   ["--overwrite_output_dir", "--resume_from_checkpoint", "latest"]],
                         ids=["plain", "overwrite", "resume", "both"])
def test_the_input_model_folder_is_never_written(tiny_pipeline, digits_dir, tmp_path, capsys, flags):
    import shutil

    model = tmp_path / "models" / "mine"
    shutil.copytree(tiny_pipeline, model)
    before = snapshot(tmp_path / "models")
    for out, relation in ((model, "is"), (model / "memmit-out", "lies inside"), (tmp_path / "models", "holds")):
        assert train_main(args(str(model), digits_dir, out, "--num_shards", 1, *flags)) == 2
        err = capsys.readouterr().err
        assert f"output_dir {str(out)!r} {relation} the pretrained_model_name_or_path folder" in err, err
        assert "--overwrite_output_dir" not in err and "--resume_from_checkpoint" not in err
    assert snapshot(tmp_path / "models") == before


def test_a_replacement_vae_folder_is_an_input_too(tiny_sd_pipeline, captioned_digits_dir, tmp_path, capsys):
    vae = tmp_path / "vae"
    load_pipeline(tiny_sd_pipeline).vae.save_pretrained(vae)
    assert train_main(args(tiny_sd_pipeline, captioned_digits_dir, vae, "--caption_column", "text",
                           "--pretrained_vae_model_name_or_path", vae, "--overwrite_output_dir")) == 2
    assert "is the pretrained_vae_model_name_or_path folder" in capsys.readouterr().err


def test_an_output_dir_that_is_a_file_is_refused(tiny_pipeline, digits_dir, tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("mine")
    assert train_main(args(tiny_pipeline, digits_dir, out)) == 2
    assert f"output_dir {str(out)!r} is a file" in capsys.readouterr().err and out.read_text() == "mine"


def test_latest_in_a_used_folder_without_checkpoints_starts_nothing_stale(tiny_pipeline, digits_dir, tmp_path,
                                                                          capsys):
    """`--resume_from_checkpoint latest` with no checkpoint is a new run: in a folder of another run's files it is
    refused (resuming is not offered), and with --overwrite_output_dir the old files go."""
    out = tmp_path / "out"
    (out / "memmit" / "eval" / "before").mkdir(parents=True)
    (out / "memmit" / "duplicates.json").write_text('{"stale": true}')
    (out / "memmit" / "eval" / "before" / "report.json").write_text("{}")
    flags = args(tiny_pipeline, digits_dir, out, "--num_shards", 1, "--num_rounds", 1, "--local_steps", 1,
                 "--dedup", "none", "--resume_from_checkpoint", "latest")
    assert train_main(flags) == 2
    err = capsys.readouterr().err
    assert "is not empty and holds no checkpoint to resume; pass --overwrite_output_dir" in err
    assert "--resume_from_checkpoint latest to continue" not in err
    assert train_main(flags + ["--overwrite_output_dir"]) == 0
    assert not (out / "memmit" / "duplicates.json").exists() and not (out / "memmit" / "eval").exists()


# A value other than the default for each text-to-image option (its type's, within its choices).
TEXT_VALUES = {"caption_column": "text", "dedup_captions": "anchor", "weighting_scheme": "mode", "class_names": ["a"],
               "validation_prompts": ["a digit"], "alignment_classifier": "classifier.pt", "prompts_file": "p.txt",
               "detect_prompts": True, "dedup_anchors": 2, "max_sequence_length": 8, "snr_gamma": 5.0}


@pytest.mark.parametrize("option", TEXT_TO_IMAGE_OPTIONS)
def test_every_text_option_on_an_unconditional_pipeline_is_refused_by_name(tiny_pipeline, option):
    defaults = {f.name: f.default for cls in (EvalConfig, MemmitConfig) for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING}
    value = TEXT_VALUES.get(option, 0.25 if isinstance(defaults.get(option), float) else None)
    assert value is not None and value != defaults.get(option), option
    cfg = SimpleNamespace(**{**dataclasses.asdict(MemmitConfig(pretrained_model_name_or_path=tiny_pipeline,
                                                               dataset_name="data")), option: value})
    with pytest.raises(ValueError, match=rf"^{option}: text-to-image options, and DDPMPipeline is unconditional"):
        load_task(cfg)


def test_dedup_captions_without_a_caption_column_names_what_is_missing(tiny_pipeline, digits_dir, tmp_path, capsys):
    assert train_main(args(tiny_pipeline, digits_dir, tmp_path / "out", "--dedup_captions", "anchor")) == 2
    err = capsys.readouterr().err
    assert "dedup_captions=anchor acts on captions, and no --caption_column is given" in err
    assert "got keep_one" not in err


def test_evaluate_with_a_cache_that_cannot_be_written_fails_before_any_work(tiny_pipeline, digits_dir, tmp_path,
                                                                          capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MEMMIT_CACHE", str(blocker / "cache"))
    out = tmp_path / "out"
    assert train_main(args(tiny_pipeline, digits_dir, out, "--evaluate")) == 2
    assert f"memmit's cache folder {str(blocker / 'cache' / 'eval')!r} cannot be written" in capsys.readouterr().err
    assert not out.exists()


def test_a_hub_id_under_offline_mode_says_the_hub_was_not_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set, so the Hub was not asked"):
        load_pipeline("someone/some-pipeline")
    from memmit.data.dataset import load_train_dataset

    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set, so the Hub was not asked"):
        load_train_dataset(dataset_name="someone/some-dataset")


def image_folder(path: Path, images, captions=None) -> Path:
    """An imagefolder dataset: one PNG a digit (and metadata.jsonl with a caption each)."""
    import json

    path.mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(path / f"digit{i}.png")
    if captions is not None:
        (path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"digit{i}.png", "text": c}) + "\n"
                                                     for i, c in enumerate(captions)))
    return path


def replace_keeping_mtime(target: Path, source: Path) -> None:
    """What `cp -p` does: other bytes, the same modification time."""
    import os

    stat = target.stat()
    target.write_bytes(source.read_bytes())
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_digests_follow_the_bytes_and_captions_not_the_names_or_times(tmp_path):
    import hashlib
    import json

    import datasets

    from conftest import mnist_images
    from memmit.data.content import first_difference, sample_digests

    images, _ = mnist_images(5)
    folder = image_folder(tmp_path / "data", images[:4], [f"digit {i}" for i in range(4)])
    load = lambda: datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")  # noqa: E731
    before = sample_digests(load(), "image", "text")
    assert len(set(before)) == 4 and sample_digests(load(), "image", "text") == before
    # The contract written out: sha256 of the file's bytes, then of the caption as JSON, 32 hex digits.
    for caption, digests in (("digit 1", before), (None, sample_digests(load(), "image"))):
        expected = hashlib.sha256((folder / "digit1.png").read_bytes() + json.dumps(caption).encode())
        assert digests[1] == expected.hexdigest()[:32]
    images[4].save(tmp_path / "other.png")
    replace_keeping_mtime(folder / "digit2.png", tmp_path / "other.png")
    after = sample_digests(load(), "image", "text")
    assert [a == b for a, b in zip(before, after)] == [True, True, False, True]
    assert first_difference(before, after, [f"digit{i}.png" for i in range(4)]) == "sample 2 (digit2.png) changed"
    assert first_difference(before, before[:3], ["x"] * 4) == "1 sample(s) from id 3 on were removed (3 samples now)"


def test_resume_on_an_image_replaced_in_place_is_refused_naming_it(tiny_pipeline, tmp_path, capsys):
    from conftest import mnist_images

    images, _ = mnist_images(9)
    folder = image_folder(tmp_path / "data", images[:8])
    out = tmp_path / "out"
    flags = ["--pretrained_model_name_or_path", tiny_pipeline, "--train_data_dir", str(folder), "--output_dir",
             str(out), "--train_batch_size", "2", "--report_to", "none", "--num_shards", "2", "--num_rounds", "2",
             "--local_steps", "1", "--checkpointing_steps", "1", "--dedup", "none"]
    assert train_main(flags) == 0
    images[8].save(tmp_path / "other.png")
    replace_keeping_mtime(folder / "digit3.png", tmp_path / "other.png")
    assert train_main(flags + ["--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert "the training data changed since it was written (sample 3 (" in err and "digit3.png) changed)" in err


def test_an_image_replaced_in_place_is_a_new_latent_cache(tiny_sd_pipeline, tmp_path, capsys, monkeypatch):
    from conftest import mnist_images

    monkeypatch.setenv("MEMMIT_CACHE", str(tmp_path / "cache"))
    images, _ = mnist_images(9)
    folder = image_folder(tmp_path / "data", [i.convert("RGB") for i in images[:8]],
                          [f"a handwritten digit {i}" for i in range(8)])
    flags = ["--pretrained_model_name_or_path", tiny_sd_pipeline, "--train_data_dir", str(folder), "--output_dir",
             str(tmp_path / "out"), "--caption_column", "text", "--train_batch_size", "4", "--report_to", "none",
             "--num_shards", "1", "--num_rounds", "1", "--local_steps", "1", "--dedup", "none", "--cache_latents",
             "--center_crop", "--overwrite_output_dir"]
    said = []
    for change in (False, True, False):
        if change:
            images[8].convert("RGB").save(tmp_path / "other.png")
            replace_keeping_mtime(folder / "digit5.png", tmp_path / "other.png")
        assert train_main(flags) == 0
        said.append("reusing the cached latents" in capsys.readouterr().out)
    assert said == [False, False, True]
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == 2
