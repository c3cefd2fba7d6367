"""--cache_latents: the same losses as encoding at every step, reuse by later runs, and what it refuses."""

from __future__ import annotations

import datasets
import pytest
import torch

from memmit.data.captions import ANCHORS
from memmit.cli import run, train_main
from memmit.config import parse_args
from memmit.draws import DATA, NOISE
from memmit.data.content import sample_digests
from memmit.families.latents import cached_inputs
from memmit.train.shards import MicroBatch

from test_text_to_image import make_task, weights
from test_train import args

# Every draw the cache must reproduce: the flip coin, the pick among a row's captions, dropout, caption rules.
DRAWN = ["--caption_column", "captions", "--center_crop", "--random_flip", "--caption_dropout", 0.2,
         "--caption_replace_prob", 0.3]


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMMIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "latents"


# Each family's pipeline fixture and flags (the transformers' T5 prompts kept short).
FAMILIES = {"sd": ("tiny_sd_pipeline", []), "sdxl": ("tiny_sdxl_pipeline", []),
            "sd3": ("tiny_sd3_pipeline", ["--resolution", 16, "--max_sequence_length", 32]),
            "flux": ("tiny_flux_pipeline", ["--resolution", 16, "--max_sequence_length", 32])}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_inputs_give_the_losses_that_encoding_every_step_gives(family, captioned_digits_dir, cache, request):
    """Every family's conditioning comes from the cache: hidden states, pooled embeddings (SDXL, SD3, Flux) and
    SDXL's time_ids from each image's original size and flip."""
    fixture, flags = FAMILIES[family]
    task = make_task(request.getfixturevalue(fixture), captioned_digits_dir, *DRAWN, *flags)
    ds = datasets.load_from_disk(captioned_digits_dir)
    task.use_training_captions(ds["captions"])
    content = sample_digests(ds, "image", "captions")
    cached = cached_inputs(task, ds, content, "image", "captions", random_flip=True, device=torch.device("cpu"))
    batch = MicroBatch(0, 3, tuple(range(4, 24)), tuple(range(20)))
    rows = ds[list(batch.ids)]
    # Two copies anchored (dedup_captions=anchor): their anchors are encoded in the step, cache or not.
    rows[ANCHORS] = [["the number 3", "digit 1 written by hand"] if i % 9 == 0 else [] for i in batch.ids]
    plain, from_cache = (make(rows, batch.generators(7, DATA), batch.ids) for make in (task.inputs, cached))
    # Some prompts were made up by caption replacement (encoded in the step), the others read from the cache.
    assert 0 < int(from_cache["encode"].sum()) < len(batch.ids)
    assert torch.equal(plain["input_ids"], from_cache["input_ids"])
    assert torch.equal(plain["anchor_ids"], from_cache["anchor_ids"]) and int(from_cache["anchored"].sum()) == 2
    assert ("pooled" in from_cache) == (family != "sd")
    if family == "sdxl":
        assert torch.equal(from_cache["time_ids"], plain["time_ids"])
    with torch.no_grad():
        want = task.per_sample_loss(task.denoiser, plain, batch.generators(7, NOISE), torch.device("cpu"))
        got = task.per_sample_loss(task.denoiser, from_cache, batch.generators(7, NOISE), torch.device("cpu"))
    assert torch.equal(got.timesteps, want.timesteps)
    # The VAE encoded these images in other batches: float rounding apart, the same values.
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-4, atol=1e-6)


def test_a_later_run_reuses_the_cache_and_another_resolution_rebuilds_it(tiny_sd_pipeline, captioned_digits_dir,
                                                                         cache, tmp_path, capsys):
    common = [*DRAWN, "--num_shards", 2, "--num_rounds", 1, "--local_steps", 2]
    run(parse_args(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path / "plain", *common)))
    run(parse_args(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path / "first", *common, "--cache_latents")))
    assert "latents and text embeddings cached in" in capsys.readouterr().out
    run(parse_args(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path / "again", *common, "--cache_latents",
                        "--dataloader_num_workers", 1)))
    assert "reusing the cached latents" in capsys.readouterr().out
    assert len(list(cache.iterdir())) == 1
    plain, first, again = (weights(tmp_path / name, "unet") for name in ("plain", "first", "again"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    for name in plain:
        torch.testing.assert_close(first[name], plain[name], rtol=1e-4, atol=1e-6)

    run(parse_args(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path / "larger", *common, "--cache_latents",
                        "--resolution", 24)))
    assert "latents and text embeddings cached in" in capsys.readouterr().out
    assert len(list(cache.iterdir())) == 2


def test_what_the_cache_cannot_serve_is_refused_before_training(tiny_pipeline, tiny_sd_pipeline, digits_dir,
                                                               captioned_digits_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert train_main(args(tiny_pipeline, digits_dir, out, "--cache_latents", "--center_crop")) == 2
    assert "--cache_latents caches the VAE latents and text-encoder outputs of text-to-image pipelines; " \
           "DDPMPipeline trains on pixels" in capsys.readouterr().err
    assert train_main(args(tiny_sd_pipeline, captioned_digits_dir, out, "--caption_column", "text",
                           "--cache_latents")) == 2
    assert "--cache_latents needs --center_crop" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MEMMIT_CACHE", str(blocker / "cache"))
    assert train_main(args(tiny_sd_pipeline, captioned_digits_dir, out, "--caption_column", "text",
                           "--cache_latents", "--center_crop")) == 2
    assert f"memmit's cache folder {str(blocker / 'cache' / 'latents')!r} cannot be written (Not a directory)" \
        in capsys.readouterr().err
    assert not (out / "model_index.json").exists()
