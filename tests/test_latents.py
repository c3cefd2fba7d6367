"""--cache_latents: the same losses as encoding at every step, reuse by later runs, and what it refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest
import torch
import torch.multiprocessing as mp

from memmit.data.captions import ANCHORS
from memmit.cli import run, train_main
from memmit.config import parse_args
from memmit.draws import DATA, NOISE
from memmit.data.content import sample_digests
from memmit.families import latents
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


def step_inputs(task, ds, make) -> dict:
    """Inputs of one micro-batch (some rows anchored) and its losses, from `make`: task.inputs or the cache."""
    batch = MicroBatch(0, 3, tuple(range(4, 24)), tuple(range(20)))
    rows = ds[list(batch.ids)]
    # Two copies anchored (dedup_captions=anchor): their anchors are encoded in the step, cache or not.
    rows[ANCHORS] = [["the number 3", "digit 1 written by hand"] if i % 9 == 0 else [] for i in batch.ids]
    inputs = make(rows, batch.generators(7, DATA), batch.ids)
    with torch.no_grad():
        losses = task.per_sample_loss(task.denoiser, inputs, batch.generators(7, NOISE), torch.device("cpu"))
    return {**inputs, "losses": losses.losses, "timesteps": losses.timesteps}


def cached_task(request, family, captioned_digits_dir, text_limit_gb=20.0):
    fixture, flags = FAMILIES[family]
    task = make_task(request.getfixturevalue(fixture), captioned_digits_dir, *DRAWN, *flags)
    ds = datasets.load_from_disk(captioned_digits_dir)
    task.use_training_captions(ds["captions"])
    content = sample_digests(ds, "image", "captions")
    return task, ds, cached_inputs(task, ds, content, "image", "captions", random_flip=True,
                                   device=torch.device("cpu"), text_limit_gb=text_limit_gb)


@pytest.fixture
def small_chunks(monkeypatch):
    """24 images and their prompts in chunks of 5 files, the last one partial."""
    monkeypatch.setattr(latents, "CHUNK_ROWS", 5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_inputs_give_the_losses_that_encoding_every_step_gives(family, captioned_digits_dir, cache, request,
                                                                      small_chunks):
    """Every family's conditioning comes from the cache: hidden states, pooled embeddings (SDXL, SD3, Flux) and
    SDXL's time_ids from each image's original size and flip."""
    task, ds, cached = cached_task(request, family, captioned_digits_dir)
    assert len(list(cache.glob("*/latents-*.safetensors"))) == 5 and not list(cache.glob(".partial-*"))
    plain, from_cache = step_inputs(task, ds, task.inputs), step_inputs(task, ds, cached)
    # Some prompts were made up by caption replacement (encoded in the step), the others read from the cache.
    assert 0 < int(from_cache["encode"].sum()) < 20
    assert torch.equal(plain["input_ids"], from_cache["input_ids"])
    assert torch.equal(plain["anchor_ids"], from_cache["anchor_ids"]) and int(from_cache["anchored"].sum()) == 2
    assert ("pooled" in from_cache) == (family != "sd")
    if family == "sdxl":
        assert torch.equal(from_cache["time_ids"], plain["time_ids"])
    assert torch.equal(from_cache["timesteps"], plain["timesteps"])
    # The VAE encoded these images in other batches: float rounding apart, the same values.
    torch.testing.assert_close(from_cache["losses"], plain["losses"], rtol=1e-4, atol=1e-6)


def test_text_above_the_limit_is_encoded_in_the_step_and_the_log_says_so(captioned_digits_dir, cache, request,
                                                                         capsys):
    task, ds, cached = cached_task(request, "sd3", captioned_digits_dir, text_limit_gb=1e-6)
    out = capsys.readouterr().out
    assert "memmit: latents cached in" in out
    # SD3's three encoders at 32 + 77 T5 and CLIP tokens: 109 x 64 fp32 values and a pooled 64 a prompt.
    prompts = len(latents.training_prompts(ds["captions"], "captions"))
    assert f"the text encoders' outputs are not cached: {prompts} prompts would take" in out
    assert "above cache_text_limit_gb=1e-06; each step encodes its prompts" in out
    assert not list(cache.glob("*/text-*.safetensors"))
    plain, from_cache = step_inputs(task, ds, task.inputs), step_inputs(task, ds, cached)
    assert "text" not in from_cache and "pooled" not in from_cache
    torch.testing.assert_close(from_cache["losses"], plain["losses"], rtol=1e-4, atol=1e-6)


def test_a_killed_build_resumes_at_the_chunks_it_had_not_written(captioned_digits_dir, cache, request, small_chunks):
    """What a kill leaves: the staging folder with some chunks whole and a half-written temporary file."""
    task, ds, first = cached_task(request, "sd", captioned_digits_dir)
    built = Path(first.directory)
    staging = built.parent / f".partial-{built.name}"
    built.rename(staging)
    for name in ("index.json", "prompts.json", "latents-000000.safetensors", "text-000000.safetensors"):
        (staging / name).unlink()
    (staging / ".latents-000000.999.tmp").write_bytes(b"half")
    kept = {p.name: p.stat().st_mtime_ns for p in staging.glob("*.safetensors")}
    task, ds, again = cached_task(request, "sd", captioned_digits_dir)
    assert again.directory == first.directory and not staging.exists()
    assert {name: (built / name).stat().st_mtime_ns for name in kept} == kept
    assert (built / "latents-000000.safetensors").is_file() and not list(built.glob(".*"))
    torch.testing.assert_close(step_inputs(task, ds, again)["losses"], step_inputs(task, ds, task.inputs)["losses"],
                               rtol=1e-4, atol=1e-6)


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


def _two_builders(rank: int, pipe: str, data: str, port: int, results: str) -> None:
    import torch.distributed as dist

    from memmit.workers import Workers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    latents.CHUNK_ROWS = 5
    encoded = []
    images, prompts = latents._encode_images, latents._encode_prompts
    latents._encode_images = lambda task, ds, col, rows, *a: encoded.append(["latents", list(rows)]) or images(
        task, ds, col, rows, *a)
    latents._encode_prompts = lambda task, chunk, device: encoded.append(["text", len(chunk)]) or prompts(
        task, chunk, device)
    task = make_task(pipe, data, *DRAWN)
    ds = datasets.load_from_disk(data)
    cached = cached_inputs(task, ds, sample_digests(ds, "image", "captions"), "image", "captions", True,
                           torch.device("cpu"), 20.0, Workers(rank, 2, dist.barrier), show_progress=False)
    Path(results, f"{rank}.json").write_text(json.dumps({"encoded": encoded, "directory": cached.directory}))
    dist.destroy_process_group()


@pytest.mark.slow  # ~10 s: two spawned processes each building a text-to-image task
def test_two_processes_build_one_cache_each_a_share_of_the_chunks(tiny_sd_pipeline, captioned_digits_dir, cache,
                                                                   request, small_chunks, tmp_path, capsys):
    """Chunks 0, 2, 4 (latents 0-4, 10-14, 20-23) on the first process, 1 and 3 and the prompts on the second: the
    work items are the five image chunks, then the prompt chunk."""
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_two_builders, args=(tiny_sd_pipeline, captioned_digits_dir, 29900 + os.getpid() % 90, str(results)),
             nprocs=2)
    zero, one = (json.loads((results / f"{rank}.json").read_text()) for rank in (0, 1))
    assert zero["directory"] == one["directory"]
    assert zero["encoded"] == [["latents", list(range(0, 5))], ["latents", list(range(10, 15))],
                               ["latents", list(range(20, 24))]]
    assert one["encoded"][:2] == [["latents", list(range(5, 10))], ["latents", list(range(15, 20))]]
    assert [kind for kind, _ in one["encoded"][2:]] == ["text"]
    task, ds, alone = cached_task(request, "sd", captioned_digits_dir)
    assert alone.directory == zero["directory"]  # a one-process run reuses what the two built
    assert "reusing the cached latents and text embeddings" in capsys.readouterr().out
    torch.testing.assert_close(step_inputs(task, ds, alone)["losses"], step_inputs(task, ds, task.inputs)["losses"],
                               rtol=1e-4, atol=1e-6)
