"""Two real gloo processes through `accelerate launch`: same result as one process, and exact resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# AGC strict enough, on a bank of 10 entries, that 24 digits see exclusions after round 0.
COMMON = ["--num_shards", "4", "--num_rounds", "2", "--local_epochs", "2", "--agc_lambda", "0.95",
          "--agc_bank_bins", "10", "--agc_exclusion", "0.5", "--agc_exclusion_min_visits", "2",
          "--train_batch_size", "4", "--report_to", "none", "--num_validation_images", "0"]


def launch_env(**extra: str) -> dict:
    """gloo processes on the CPU, one thread each, offline."""
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true", **extra)


def accelerate_launch(num_processes: int) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(num_processes),
           "--main_process_port", str(29500 + os.getpid() % 1000)]
    return cmd + ["--multi_gpu"] if num_processes > 1 else cmd


def launch(num_processes: int, pipe: str, data: str, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = accelerate_launch(num_processes) + [str(ROOT / "train_memmit.py"), "--pretrained_model_name_or_path", pipe,
                                              "--dataset_name", data, "--output_dir", str(out), *COMMON, *extra]
    # A session of its own, so the launcher and both workers can be killed together.
    return subprocess.Popen(cmd, env=launch_env(**(env or {})), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    log = proc.communicate()[0].decode()
    assert proc.returncode == 0, log
    return log


def weights(out: Path) -> dict:
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow  # ~60 s of launched processes; the one-shard group test below runs in make test
def test_two_processes_equal_one_and_resume_exactly(tiny_pipeline, digits_dir, tmp_path):
    finish(launch(1, tiny_pipeline, digits_dir, tmp_path / "one"))
    log = finish(launch(2, tiny_pipeline, digits_dir, tmp_path / "two", "--checkpointing_steps", "1000"))
    assert "resumed" not in log
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in one:
        # The sum over shards is associated differently (two partial sums, then an all-reduce).
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "one" / "memmit" / "candidates.csv").read_text() == \
        (tmp_path / "two" / "memmit" / "candidates.csv").read_text()
    # Both processes decided the same exclusions from the gathered counts (round 0's shape round 1).
    excluded = (tmp_path / "one" / "memmit" / "excluded.json").read_text()
    assert '"round": 0' in excluded and excluded == (tmp_path / "two" / "memmit" / "excluded.json").read_text()

    # Kill both processes mid-run, then resume with the same number of processes.
    out = tmp_path / "killed"
    every_step = ["--checkpointing_steps", "1", "--checkpoints_total_limit", "100"]
    steps = kill_after_first_checkpoint(launch(2, tiny_pipeline, digits_dir, out, *every_step), out)
    assert steps and steps[-1] < 16, "the run was not killed before its end"  # 16 steps per process
    log = finish(launch(2, tiny_pipeline, digits_dir, out, *every_step, "--resume_from_checkpoint", "latest"))
    assert "resumed from" in log
    resumed = weights(out)
    assert all(torch.equal(resumed[k], two[k]) for k in two)
    # Step 5 of round 0's 8: slot 0's shards (0 on rank 0, 1 on rank 1) are in the round's sum, each in its
    # own process's share of it, which each process must get back.
    finish(launch(2, tiny_pipeline, digits_dir, out, *every_step, "--resume_from_checkpoint", "checkpoint-5"))
    resumed = weights(out)
    assert all(torch.equal(resumed[k], two[k]) for k in two)


def kill_after_first_checkpoint(proc: subprocess.Popen, out: Path) -> list[int]:
    deadline = time.time() + 180
    while not list((out / "checkpoints").glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model_index.json").exists()
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))


@pytest.mark.slow  # ~30 s of launched processes
def test_checkpoint_mid_turn_on_two_processes_resumes_exactly_and_every_process_logs(tiny_pipeline, digits_dir,
                                                                                   tmp_path):
    """K = P = 2: each round is one turn slot, so every checkpoint falls inside it. 19 samples at batch 3 make
    shards of 10 and 9, 8 and 6 steps a turn: rank 1 idles while rank 0 finishes, and both save together."""
    extra = ["--num_shards", "2", "--max_train_samples", "19", "--train_batch_size", "3", "--dedup", "none"]
    mlruns = tmp_path / "mlruns"
    tracked = {"MLFLOW_TRACKING_URI": f"file:{mlruns}", "MLFLOW_ALLOW_FILE_STORE": "true"}
    finish(launch(2, tiny_pipeline, digits_dir, tmp_path / "ref", *extra, "--checkpointing_steps", "1000",
                  "--report_to", "all", env=tracked))

    out = tmp_path / "killed"
    steps = kill_after_first_checkpoint(launch(2, tiny_pipeline, digits_dir, out, *extra, "--checkpointing_steps", "1"),
                                        out)
    assert steps and steps[-1] < 8, f"not killed inside the first turn: {steps}"
    log = finish(launch(2, tiny_pipeline, digits_dir, out, *extra, "--checkpointing_steps", "1",
                        "--resume_from_checkpoint", "latest"))
    assert "resumed from" in log
    ref, resumed = weights(tmp_path / "ref"), weights(out)
    assert all(torch.equal(resumed[k], ref[k]) for k in ref)

    # Shard 1 trains on rank 1; its values reach both trackers "all" started (tensorboard and mlflow).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [EventAccumulator(str(p.parent)).Reload() for p in (tmp_path / "ref" / "logs").rglob("events.out.tfevents*")]
    tags = {t for run in runs for t in run.Tags()["scalars"]}
    assert {"shard_0/loss", "shard_1/loss", "shard_1/skip_fraction", "shard_1/lr"} <= tags, tags
    shard1_steps = [e.step for run in runs if "shard_1/lr" in run.Tags()["scalars"] for e in run.Scalars("shard_1/lr")]
    assert shard1_steps == [1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14]  # idle at steps 7-8 and 15-16
    metrics = {p.relative_to(p.parents[1]).as_posix() for p in mlruns.rglob("metrics/shard_*/*")}
    assert {"shard_0/loss", "shard_1/loss", "shard_1/skip_fraction"} <= metrics, metrics


def test_one_shard_on_two_processes_equals_one_process_with_twice_the_batch(tiny_pipeline, digits_dir, tmp_path):
    """K = 1 trained by a group of two processes, each taking half of every micro-batch (loaded in workers), is
    one process with the whole micro-batch: the same AGC masks and bank, so the same skips and exclusions."""
    extra = ["--num_shards", "1", "--local_epochs", "3"]
    finish(launch(1, tiny_pipeline, digits_dir, tmp_path / "one", *extra, "--train_batch_size", "6"))
    finish(launch(2, tiny_pipeline, digits_dir, tmp_path / "two", *extra, "--train_batch_size", "3",
                  "--dataloader_num_workers", "1"))
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in one:
        # The gradient is summed in another order (two halves, then an all-reduce), and Adam divides by sqrt(v):
        # a weight whose gradient is near zero can move ~1e-5 apart over the run (measured 1.6e-5 on 2026-12-03).
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=5e-5)
    candidates = (tmp_path / "one" / "memmit" / "candidates.csv").read_text()
    assert candidates == (tmp_path / "two" / "memmit" / "candidates.csv").read_text()
    assert any(int(row.split(",")[3]) for row in candidates.splitlines()[1:]), "AGC skipped nothing: nothing tested"
    excluded = (tmp_path / "one" / "memmit" / "excluded.json").read_text()
    assert '"round": 0' in excluded and excluded == (tmp_path / "two" / "memmit" / "excluded.json").read_text()


@pytest.mark.slow  # ~60 s: four launched processes, three times
def test_two_shards_on_four_processes_resume_exactly_from_mid_round(tiny_pipeline, digits_dir, tmp_path):
    """Two groups of two; killed inside the first round's turn (with a data-loading worker each), resumed."""
    extra = ["--num_shards", "2", "--train_batch_size", "2", "--dataloader_num_workers", "1", "--random_flip"]
    finish(launch(4, tiny_pipeline, digits_dir, tmp_path / "ref", *extra, "--checkpointing_steps", "1000"))
    out = tmp_path / "killed"
    steps = kill_after_first_checkpoint(launch(4, tiny_pipeline, digits_dir, out, *extra, "--checkpointing_steps", "1"),
                                        out)
    assert steps and steps[-1] < 6, f"not killed inside the first round: {steps}"  # 12 samples a shard, 4 a step
    log = finish(launch(4, tiny_pipeline, digits_dir, out, *extra, "--checkpointing_steps", "1",
                        "--resume_from_checkpoint", "latest"))
    assert "resumed from" in log
    ref, resumed = weights(tmp_path / "ref"), weights(out)
    assert all(torch.equal(resumed[k], ref[k]) for k in ref)


@pytest.mark.slow  # ~60 s: a text-to-image pipeline trained by two launched processes, and by one
def test_two_processes_build_the_latent_cache_together_and_train_as_one(tiny_sd_pipeline, captioned_digits_dir,
                                                                        tmp_path):
    """Each process encodes its share of the cache (families/latents.py), and the run equals a one-process run with
    a cache of its own."""
    extra = ["--num_shards", "2", "--caption_column", "text", "--center_crop", "--cache_latents", "--dedup", "none",
             "--agc_lambda", "0", "--num_rounds", "1", "--local_epochs", "1"]
    logs = [finish(launch(n, tiny_sd_pipeline, captioned_digits_dir, tmp_path / str(n), *extra,
                          env={"MEMMIT_CACHE": str(tmp_path / f"cache-{n}")})) for n in (1, 2)]
    assert all("latents and text embeddings cached in" in log for log in logs)
    one, two = weights(tmp_path / "1"), weights(tmp_path / "2")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    built = [sorted(p.name for p in (tmp_path / f"cache-{n}" / "latents").glob("*/*")) for n in (1, 2)]
    assert built[0] == built[1] and "index.json" in built[0]


def test_shards_that_cannot_share_the_processes_evenly_are_refused():
    from memmit.train.group import group_size

    assert [group_size(k, 4) for k in (1, 2, 4, 6)] == [4, 2, 1, 1]
    with pytest.raises(ValueError, match=r"num_shards=2 does not divide the 3 processes.*pass --num_shards 1 \| 3"):
        group_size(2, 3)
