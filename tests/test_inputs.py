"""Bad inputs the trainer refuses before training, by name, leaving no output folder."""

from __future__ import annotations

import pytest

from memmit.cli import train_main

from test_train import args, fresh_accelerator  # noqa: F401  (the autouse accelerator reset applies here too)


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
