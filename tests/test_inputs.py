"""Bad inputs the trainer refuses before training, by name, leaving no output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import pytest

from memmit.cli import train_main
from memmit.config import check_mixed_precision
from memmit.data.dataset import check_captions, load_train_dataset

from test_train import ROOT, args


def assert_refused(flags: list, message: str, out, capsys) -> str:
    """train_main exits 2 with one error line holding `message`, and writes nothing to `out`."""
    assert train_main(list(map(str, flags))) == 2, flags
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("memmit: error:") == 1
    assert not out.exists()
    return err


def test_stable_diffusion_resolution_the_pipeline_cannot_take(tiny_sd_pipeline, captioned_digits_dir, tmp_path,
                                                              capsys):
    out = tmp_path / "out"
    assert_refused(args(tiny_sd_pipeline, captioned_digits_dir, out, "--caption_column", "text", "--resolution", 20),
                   "resolution 20 must be a multiple of 8 for this pipeline (its VAE downsamples the image by 2 and "
                   "StableDiffusionPipeline renders only multiples of 8); pass --resolution 16 or 24", out, capsys)


def write_captioned_folder(folder, captions: list) -> str:
    """Real digits as PNG files, listed in metadata.jsonl with their captions (`...`: no caption key)."""
    from conftest import mnist_images

    folder.mkdir()
    lines = []
    for i, (image, caption) in enumerate(zip(mnist_images(len(captions))[0], captions)):
        image.save(folder / f"digit{i}.png")
        lines.append(json.dumps({"file_name": f"digit{i}.png",
                                 **({} if caption is ... else {"text": caption})}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


@pytest.mark.parametrize("values, problem", [
    ([None], "no caption (None)"),
    ([""], "an empty caption ''"),
    ([" \n"], "an empty caption ' \\n'"),
    ([[]], "an empty list of captions"),
    ([["a two", ""]], "a list of captions holding an empty caption ''"),
    ([["a two", None]], "a list of captions holding no caption (None)"),
])
def test_every_caption_is_checked_and_the_first_bad_one_is_named(values, problem):
    good = [["a one"]] if isinstance(values[0], list) else ["a one"]
    ds = datasets.Dataset.from_dict({"image": [None] * 4, "text": good * 2 + values + good})
    with pytest.raises(ValueError) as info:
        check_captions(ds, "text", "image")
    assert str(info.value) == (f"caption_column 'text': sample 2 has {problem}; every image needs a non-empty "
                               "caption, a string or a list of strings")
    check_captions(ds.select([0, 1, 3]), "text", "image")
    check_captions(ds, None, "image")


def test_a_caption_of_another_type_is_named_with_the_count_of_bad_samples():
    ds = datasets.Dataset.from_dict({"image": [None] * 3, "text": [7, 8, 9]})
    with pytest.raises(ValueError, match=r"sample 0 has 7 of type int \(2 more of the 3 samples have the same problem\)"):
        check_captions(ds, "text", "image")


@pytest.mark.parametrize("caption, problem", [(..., "no caption (None)"), ("", "an empty caption ''")],
                         ids=["missing", "empty"])
def test_train_and_eval_refuse_an_image_without_a_caption_naming_its_file(tiny_sd_pipeline, tmp_path, capsys,
                                                                         caption, problem):
    from memmit.cli import eval_main

    data = write_captioned_folder(tmp_path / "data", ["a one", "a two", caption, "a four"])
    message = (f"caption_column 'text': sample 2 ({tmp_path / 'data' / 'digit2.png'}) has {problem}; every image "
               "needs a non-empty caption")
    out = tmp_path / "out"
    flags = ["--pretrained_model_name_or_path", tiny_sd_pipeline, "--train_data_dir", data,
             "--caption_column", "text", "--output_dir", out]
    assert_refused(flags + ["--report_to", "none"], message, out, capsys)
    assert eval_main(list(map(str, flags + ["--num_samples", 2]))) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_only_the_training_splits_metadata_must_list_every_image(tmp_path):
    from PIL import Image

    for split, listed in [("train", 3), ("test", 1)]:
        (tmp_path / split).mkdir()
        for i in range(3):
            Image.new("L", (8, 8), i).save(tmp_path / split / f"img{i}.png")
        (tmp_path / split / "metadata.csv").write_text("file_name,text\n" + "".join(
            f"img{i}.png,digit {i}\n" for i in range(listed)))
    assert len(load_train_dataset(train_data_dir=str(tmp_path), extra_columns=("text",))) == 3
    (tmp_path / "train" / "new").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "train" / "new" / "extra.PNG")
    with pytest.raises(ValueError, match=r": 1 image file\(s\) not listed in metadata.csv, which datasets would leave "
                                         r"out of training: train/new/extra.PNG; list them there"):
        load_train_dataset(train_data_dir=str(tmp_path))


@pytest.mark.parametrize("mixed_precision, device_type, refused", [
    ("fp16", "cpu", True), ("fp16", "mps", True), ("fp16", "cuda", False), ("bf16", "cpu", False), ("no", "cpu", False),
])
def test_fp16_is_refused_where_there_is_no_gradient_scaler(mixed_precision, device_type, refused):
    if refused:
        with pytest.raises(ValueError, match=f"this run is on {device_type}; pass --mixed_precision bf16"):
            check_mixed_precision(mixed_precision, device_type)
    else:
        check_mixed_precision(mixed_precision, device_type)


@pytest.mark.slow  # ~25 s: a whole run in its own interpreter
def test_no_torchvision_warning_on_a_run(tiny_pipeline, digits_dir, tmp_path):
    """transformers warns at diffusers' import that its image processors fall back to PIL; memmit runs drop it."""
    warning = "requires torchvision (not installed)"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def stderr(*command) -> str:
        return subprocess.run([sys.executable, *command], env=env, cwd=ROOT, capture_output=True, text=True).stderr

    if warning not in stderr("-c", "import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"):
        pytest.skip("this transformers (or an installed torchvision) prints no torchvision warning")
    # Bad input that fails only once the trainer and the evaluator (and so diffusers) are imported.
    missing = ["--pretrained_model_name_or_path", str(tmp_path / "missing"), "--dataset_name", digits_dir]
    train = stderr("train_memmit.py", *missing, "--output_dir", str(tmp_path / "out"))
    evaluation = stderr("-m", "memmit.cli", "eval", *missing, "--output_dir", str(tmp_path / "eval"))
    for err in (train, evaluation):
        assert "does not exist" in err and warning not in err, err
