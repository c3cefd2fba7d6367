"""The recipe end to end on a tiny real pipeline and real digits: export, equivalence, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DiffusionPipeline
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from memmit.cli import run, train_main
from memmit.config import parse_args
from memmit.data.dataset import load_train_dataset
from memmit.data.transform import ImageTransform
from memmit.train.setup import build_trainer

from conftest import noise_generator, reset_accelerator

ROOT = Path(__file__).resolve().parents[1]


def args(pipe, data, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", pipe, "--dataset_name", data, "--output_dir", str(out),
            "--train_batch_size", "4", "--report_to", "none", "--checkpointing_steps", "1000", *map(str, extra)]


def unet_weights(out) -> dict:
    return load_file(Path(out) / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("num_shards", [2, 4])
def test_end_to_end_export_reloads_and_generates(tiny_pipeline, digits_dir, tmp_path, num_shards):
    out = tmp_path / "out"
    # 10 bank entries: each shard sees only a dozen timesteps of 50, and skips need an entry seen before.
    cfg = parse_args(args(tiny_pipeline, digits_dir, out, "--num_shards", num_shards, "--num_rounds", 2,
                          "--agc_lambda", 0.9, "--agc_bank_bins", 10))
    run(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "checkpoints", "memmit", "model_index.json",
                                                    "scheduler", "unet"]
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    assert sorted(p.name for p in (out / "memmit").iterdir()) == ["candidates.csv", "config.yaml", "duplicates.json",
                                                               "shards.json"]
    pipe = DDPMPipeline.from_pretrained(out)
    assert type(DiffusionPipeline.from_pretrained(out)) is DDPMPipeline
    before, after = load_file(Path(tiny_pipeline) / "unet" / "diffusion_pytorch_model.safetensors"), unet_weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 1) and images.std() > 0

    rows = (out / "memmit" / "candidates.csv").read_text().splitlines()
    assert rows[0] == "rank,sample_id,seen,skipped,skip_fraction,nonfinite,shard,excluded_after_round,source" and len(rows) == 25
    fields = [r.split(",") for r in rows[1:]]
    # Every trained sample is seen once per round (local_epochs=1), a near duplicate left out never; skip
    # fractions are ranked descending.
    assert all(int(f[2]) == (0 if f[6] == "duplicate" else 2) for f in fields)
    assert sum(f[6] != "duplicate" for f in fields) == sum(len(s) for s in json.loads(
        (out / "memmit" / "shards.json").read_text()).values())
    fractions = [float(f[4]) for f in fields]
    assert fractions == sorted(fractions, reverse=True) and sum(int(f[3]) for f in fields) > 0


def test_one_shard_no_agc_equals_plain_finetuning(tiny_pipeline, digits_dir, tmp_path):
    """K = 1, lambda = 0: memmit is a plain fine-tuning loop, step for step."""
    out = tmp_path / "out"
    cfg = parse_args(args(tiny_pipeline, digits_dir, out, "--num_shards", 1, "--num_rounds", 2, "--agc_lambda", 0, "--dedup", "none",
                          "--center_crop", "--lr_scheduler", "cosine", "--lr_warmup_steps", 2, "--max_grad_norm", 0.5))
    trainer = run(cfg)
    device = trainer.accelerator.device

    # The plain loop: one AdamW, one schedule, mean-squared error on epsilon, the same random draws (the data
    # order from one seeded generator, each sample's noise then timestep from its own).
    pipe = DDPMPipeline.from_pretrained(tiny_pipeline)
    unet, sched = pipe.unet.to(device).train(), pipe.scheduler
    ds = load_train_dataset(dataset_name=digits_dir)
    transform = ImageTransform(16, 1, center_crop=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    steps = 2 * 6
    lr_sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=steps)
    gen = torch.Generator().manual_seed(cfg.seed + 1000)
    for epoch in range(2):
        order = torch.randperm(24, generator=gen).tolist()
        for b in range(6):
            x0 = torch.stack([transform(img) for img in ds[order[4 * b:4 * b + 4]]["image"]])
            samples = [noise_generator(cfg.seed, 0, epoch, position) for position in range(4 * b, 4 * b + 4)]
            noise = torch.stack([torch.randn((1, 16, 16), generator=g) for g in samples])
            t = torch.stack([torch.randint(0, sched.config.num_train_timesteps, (), generator=g) for g in samples])
            x0, noise, t = x0.to(device), noise.to(device), t.to(device)
            loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 0.5)
            opt.step()
            lr_sched.step()
            opt.zero_grad()
    got = unet_weights(out)
    for name, value in unet.state_dict().items():
        # On a GPU, kernels may reduce in another order: H100 differed by at most 3e-6.
        torch.testing.assert_close(got[name], value.cpu(), rtol=1e-5, atol=1e-6 if device.type == "cpu" else 1e-5)


def run_script(argv, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train_memmit.py"), *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


@pytest.mark.parametrize("mode", [["--use_ema"], ["--lora_rank", 2, "--learning_rate", 1e-2]], ids=["full-ema", "lora"])
def test_sigkill_mid_round_then_resume_is_bit_identical(tiny_pipeline, digits_dir, tmp_path, mode):
    common = ["--num_shards", 3, "--num_rounds", 2, "--local_epochs", 3, "--agc_lambda", 0.8, "--random_flip",
              "--checkpointing_steps", 1, "--checkpoints_total_limit", 3, *mode]
    reference = run_script(args(tiny_pipeline, digits_dir, tmp_path / "ref", *common))

    out = tmp_path / "killed"
    proc = run_script(args(tiny_pipeline, digits_dir, out, *common))
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert steps and steps[-1] < 18, "the run was not killed during its first round"
    assert not (out / "model_index.json").exists()

    resumed = run_script(args(tiny_pipeline, digits_dir, out, *common, "--resume_from_checkpoint", "latest"))
    log = resumed.communicate()[0].decode()
    assert resumed.returncode == 0, log
    assert "resumed from" in log
    assert reference.wait() == 0, reference.communicate()[0].decode()
    a, b = unet_weights(tmp_path / "ref"), unet_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = load_file(Path(tiny_pipeline) / "unet" / "diffusion_pytorch_model.safetensors")
    # Averaging moves every weight by float rounding; training moves the trained ones for real.
    changed = {k for k in a if (a[k] - before[k]).abs().max() > 1e-5}
    if "--lora_rank" in mode:  # only the adapted projections
        assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in changed), changed
    assert len(list((out / "checkpoints").glob("checkpoint-*"))) == 3
    assert (out / "memmit" / "candidates.csv").read_text() == (tmp_path / "ref" / "memmit" / "candidates.csv").read_text()


@pytest.mark.slow  # ~25 s a seed: a reference run, two killed runs and the one that finishes
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_runs_killed_at_random_points_resume_to_the_uninterrupted_result(tiny_pipeline, digits_dir, tmp_path, seed):
    """Fault injection: the same command (--resume_from_checkpoint latest --overwrite_output_dir: resume when a
    checkpoint exists, start over when none does) is killed twice with SIGKILL at points drawn from the seed (while
    loading, or once the run has passed a drawn step, wherever it then is: training, checkpointing, rotating),
    then run to its end: weights and candidates.csv bit for bit the uninterrupted run's."""
    import random

    common = ["--num_shards", 3, "--num_rounds", 2, "--local_epochs", 2, "--agc_lambda", 0.8, "--random_flip",
              "--checkpointing_steps", 1, "--checkpoints_total_limit", 2, "--use_ema"]
    reference = run_script(args(tiny_pipeline, digits_dir, tmp_path / "ref", *common))
    log = reference.communicate()[0].decode()
    assert reference.returncode == 0, log
    total = max(int(p.name.split("-")[1]) for p in (tmp_path / "ref" / "checkpoints").glob("checkpoint-*"))
    out = tmp_path / "killed"
    flags = args(tiny_pipeline, digits_dir, out, *common, "--resume_from_checkpoint", "latest",
                 "--overwrite_output_dir")
    rng = random.Random(seed)

    def newest_step() -> int:
        return max((int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*")), default=0)

    for target in sorted(rng.sample(range(total), 2)):  # 0: while the run loads
        proc = run_script(flags)
        if target == 0:
            time.sleep(rng.uniform(0.2, 1.0))
        deadline = time.time() + 120
        while target and newest_step() < target and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        log = proc.communicate()[0].decode()
        assert proc.returncode == -signal.SIGKILL, log
    proc = run_script(flags)
    log = proc.communicate()[0].decode()
    assert proc.returncode == 0, log
    a, b = unet_weights(tmp_path / "ref"), unet_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "memmit" / "candidates.csv").read_text() == (tmp_path / "ref" / "memmit" / "candidates.csv").read_text()


def test_script_exit_code_and_message_for_bad_input(tmp_path, digits_dir):
    proc = run_script(["--pretrained_model_name_or_path", str(tmp_path / "nope"), "--dataset_name", digits_dir,
                       "--output_dir", str(tmp_path / "out")])
    log = proc.communicate()[0].decode()
    assert proc.returncode == 2
    assert "does not exist" in log and str(tmp_path / "nope") in log
    assert not (tmp_path / "out").exists()


def _bad_inputs(tmp_path, tiny_pipeline, digits_dir):
    """(flags, expected message) for every kind of bad input; each must fail before training."""
    import json

    import datasets
    from diffusers import DDPMScheduler
    from PIL import Image

    no_unet = tmp_path / "no_unet"
    DDPMScheduler(num_train_timesteps=10).save_pretrained(no_unet / "scheduler")
    (no_unet / "model_index.json").write_text('{"_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1", '
                                              '"scheduler": ["diffusers", "DDPMScheduler"]}')
    broken = tmp_path / "broken_images"
    broken.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), i).save(broken / f"ok{i}.png")
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "model_index.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    few = tmp_path / "few"
    datasets.load_from_disk(digits_dir).select(range(2)).save_to_disk(str(few))
    unlisted = tmp_path / "unlisted"
    unlisted.mkdir()
    for i in range(8):
        Image.new("L", (8, 8), i).save(unlisted / f"img{i}.png")
    (unlisted / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"img{i}.png", "label": i}) + "\n"
                                                     for i in range(2)))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("not\nimages\n")
    base = ["--pretrained_model_name_or_path", tiny_pipeline]
    data = ["--dataset_name", digits_dir]
    # fp16 trains on CUDA (with a gradient scaler) and is bad input everywhere else.
    fp16 = [] if torch.cuda.is_available() else [
        (base + data + ["--mixed_precision", "fp16"],
         "mixed_precision=fp16 needs a CUDA GPU (it trains with a gradient scaler), and this run is on cpu; "
         "pass --mixed_precision bf16 (or no) instead")]
    return fp16 + [
        (base + data + ["--image_column", "img"], "image_column 'img' not in dataset columns ['image', 'label']"),
        (base + data + ["--shard_strategy", "stratified", "--label_column", "digit"], "label_column 'digit' not in"),
        (base + ["--train_data_dir", str(empty)], "is empty"),
        (base + ["--dataset_name", str(few), "--num_shards", "4"], "fewer than num_shards=4"),
        (base + ["--train_data_dir", str(broken)], "bad.png"),
        (["--pretrained_model_name_or_path", str(tmp_path / "missing")] + data, "does not exist"),
        (["--pretrained_model_name_or_path", str(no_unet)] + data, "has neither a unet nor a transformer component"),
        (base + data + ["--num_shards", "0"], "num_shards must be >= 1"),
        (base + data + ["--agc_lambda", "-1"], "agc_lambda must be >= 0"),
        (base + data + ["--agc_bank_decay", "1"], "agc_bank_decay must be in [0, 1)"),
        (base + data + ["--agc_exclusion", "0"], "agc_exclusion must be in (0, 1]"),
        (base + data + ["--agc_bank_bins", "100000"], "agc_bank_bins must be between 1 and the"),
        (base + data + ["--agc_exclusion", "0.5", "--agc_exclusion_min_visits", "0"],
         "agc_exclusion_min_visits must be >= 1"),
        (base + data + ["--num_rounds", "0"], "num_rounds must be >= 1"),
        (base + data + ["--output_dir", str(busy)], "is not empty; pass --overwrite_output_dir"),
        (base + data + ["--use_8bit_adam"], "use_8bit_adam needs bitsandbytes"),
        (base + data + ["--lora_rank", "2", "--lora_target_modules", "to_x"], "match no module"),
        (base + data + ["--export", "lora"], "needs a pipeline that loads LoRA weights"),
        (base + data + ["--lora_rank", "2", "--use_ema"], "use_ema is not supported with lora_rank"),
        (base + data + ["--dedup_family_size", "1"], "dedup_family_size must be 0 (off) or >= 2, got 1"),
        (base + data + ["--dedup_threshold", "3"], "dedup_threshold 3.0 is outside [0, 2]"),
        (base + data + ["--dedup_features", str(tmp_path / "sscd.pt")], "does not exist"),
        (base + ["--train_data_dir", str(unlisted)],
         f"train_data_dir {str(unlisted)!r}: 6 image file(s) not listed in metadata.jsonl, which datasets would leave "
         "out of training: img2.png, img3.png, img4.png, img5.png, img6.png and 1 more"),
        (base + ["--dataset_name", str(notes)],
         f"dataset_name {str(notes)!r} is not a dataset: Dataset.save_to_disk did not write it, and datasets read its "
         f"files as text data with columns ['text'] and no images; for a folder of images pass --train_data_dir {notes}"),
        (base + ["--dataset_name", tiny_pipeline], f"dataset_name {tiny_pipeline!r} is not a dataset"),
        (base + data + ["--resolution", "33"],
         "resolution 33 must be a multiple of 2 for this pipeline (its UNet2DModel's 2 down blocks downsample the "
         "image by 2); pass --resolution 32 or 34"),
    ]


def test_every_bad_input_fails_before_training(tmp_path, tiny_pipeline, digits_dir, capsys):
    for flags, message in _bad_inputs(tmp_path, tiny_pipeline, digits_dir):
        out = tmp_path / "out"
        if "--output_dir" not in flags:
            flags = flags + ["--output_dir", str(out)]
        out = Path(flags[flags.index("--output_dir") + 1])
        existed = out.exists()
        assert train_main(flags + ["--report_to", "none"]) == 2, flags
        err = capsys.readouterr().err
        assert message in err, (flags, err)
        assert err.count("memmit: error:") == 1
        if existed:
            assert not (out / "checkpoints").exists() and not (out / "memmit").exists(), flags
        else:
            assert not out.exists(), (flags, sorted(p.name for p in out.iterdir()))
        reset_accelerator()


def test_overwrite_output_dir_replaces_a_finished_run(tiny_pipeline, digits_dir, tmp_path):
    """--overwrite_output_dir over a finished run (checkpoints every step, 2 shards) leaves exactly the files, and
    the bytes, that the new run writes into an empty folder: nothing of the old run passes for the new one's."""
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    first = ["--num_shards", 2, "--num_rounds", 2, "--local_steps", 1, "--checkpointing_steps", 1]
    run(parse_args(args(tiny_pipeline, digits_dir, out, *first)))
    assert len(list((out / "checkpoints").glob("checkpoint-*"))) > 1
    second = ["--num_shards", 3, "--num_rounds", 1, "--local_steps", 1]
    for folder, extra in ((out, ["--overwrite_output_dir"]), (fresh, [])):
        reset_accelerator()
        run(parse_args(args(tiny_pipeline, digits_dir, folder, *second, *extra)))

    def files(root: Path) -> dict[str, bytes]:
        # What names its folder (the saved config and checkpoints record output_dir, the card's repo id is the
        # folder's name) is compared by name, the rest byte for byte.
        named = ("config.yaml", "README.md")
        return {p.relative_to(root).as_posix(): b"" if p.name in named or "checkpoints" in p.parts else p.read_bytes()
                for p in root.rglob("*") if p.is_file()}

    assert files(out) == files(fresh)
    assert type(DiffusionPipeline.from_pretrained(out)) is DDPMPipeline


def test_bf16_autocast_keeps_unet_fp32_and_logs_sample_grids(tiny_pipeline, digits_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    flags = args(tiny_pipeline, digits_dir, out, "--num_shards", 2, "--num_rounds", 2, "--mixed_precision", "bf16",
                 "--num_validation_images", 4, "--validation_inference_steps", 2, "--shard_strategy", "stratified",
                 "--label_column", "label")
    flags[flags.index("--report_to") + 1] = "tensorboard"
    trainer = run(parse_args(flags))
    assert trainer.denoiser.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in unet_weights(out).values())
    runs = [EventAccumulator(str(p.parent)).Reload() for p in (out / "logs").rglob("events.out.tfevents*")]
    tags = {t for run in runs for kind in ("images", "scalars") for t in run.Tags()[kind]}
    assert {"samples", "shard_0/loss", "shard_1/skip_fraction", "shard_0/lr"} <= tags
    assert [e.step for run in runs if "samples" in run.Tags()["images"] for e in run.Images("samples")] == [1, 2]
    # Sampling a big model on a CPU takes minutes; the run says what it is doing meanwhile.
    assert "round 2 done; sampling 4 images (2 steps) for the logs" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast and GradScaler need CUDA")
def test_fp16_on_cuda_keeps_a_grad_scaler_per_shard(tiny_pipeline, digits_dir, tmp_path):
    out = tmp_path / "out"
    trainer = run(parse_args(args(tiny_pipeline, digits_dir, out, "--num_shards", 2, "--num_rounds", 2,
                                      "--mixed_precision", "fp16")))
    assert trainer.denoiser.dtype == torch.float32
    for shard in trainer.shards.values():
        assert shard.saved["scaler"]["scale"] > 0 and shard.saved["scaler"]["_growth_tracker"] >= 0
    assert all(torch.isfinite(v).all() for v in unet_weights(out).values())


def test_offline_push_to_hub_fails_before_training(tiny_pipeline, digits_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert train_main(args(tiny_pipeline, digits_dir, out, "--push_to_hub", "--hub_token", "hf_secret123")) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "hf_secret123" not in err
    assert not out.exists()


def test_model_card_written_without_push_and_token_never_saved(tiny_pipeline, digits_dir, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    run(parse_args(args(tiny_pipeline, digits_dir, out, "--num_shards", 2, "--num_rounds", 1, "--local_steps", 1,
                            "--hub_token", "hf_secret123")))
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and "iet-agc" in card.data.tags
    assert not [p for p in out.rglob("*") if p.is_file() and b"hf_secret123" in p.read_bytes()]


@pytest.mark.parametrize("dedup", ["keep_one", "same_shard"])
def test_dedup_finds_copies_and_splits_accordingly(tiny_pipeline, tmp_path, dedup):
    import json

    import datasets

    from conftest import mnist_images

    images, labels = mnist_images(20)
    copies = [images[3].copy() for _ in range(4)]  # sample 3 plus 4 copies: ids 3, 20..23
    ds = datasets.Dataset.from_dict({"image": images + copies, "label": labels + [labels[3]] * 4})
    ds.save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "out"
    run(parse_args(args(tiny_pipeline, str(tmp_path / "data"), out, "--num_shards", 3, "--num_rounds", 1,
                        "--dedup", dedup, "--agc_lambda", 0)))
    report = json.loads((out / "memmit" / "duplicates.json").read_text())
    assert report["num_clusters"] == 1 and report["clusters"][0]["ids"] == [3, 20, 21, 22, 23]
    shards = json.loads((out / "memmit" / "shards.json").read_text())
    flat = sorted(i for s in shards.values() for i in s)
    rows = {r.split(",")[1]: r.split(",") for r in (out / "memmit" / "candidates.csv").read_text().splitlines()[1:]}
    if dedup == "keep_one":
        assert flat == [i for i in range(24) if i not in (20, 21, 22, 23)]
        assert rows["21"][6] == "duplicate" and rows["21"][2] == "0"
    else:
        assert flat == list(range(24))
        assert sum({3, 20, 21, 22, 23} <= set(s) for s in shards.values()) == 1


def test_ema_result_is_the_averaged_ema(tiny_pipeline, digits_dir, tmp_path):
    """decay 0 makes the EMA the weights themselves; a slow EMA (past diffusers' warm-up) lags behind."""
    flags = ["--num_shards", 2, "--num_rounds", 2, "--local_epochs", 4, "--learning_rate", 1e-3]
    results = {}
    for name, extra in {"none": [], "ema0": ["--use_ema", "--ema_decay", 0.0],
                        "ema99": ["--use_ema", "--ema_decay", 0.99]}.items():
        reset_accelerator()
        run(parse_args(args(tiny_pipeline, digits_dir, tmp_path / name, *flags, *extra)))
        results[name] = unet_weights(tmp_path / name)
    before = load_file(Path(tiny_pipeline) / "unet" / "diffusion_pytorch_model.safetensors")
    moved = {n: sum(float((w[k] - before[k]).abs().sum()) for k in before) for n, w in results.items()}
    for k in before:
        torch.testing.assert_close(results["ema0"][k], results["none"][k], rtol=1e-5, atol=1e-6)
    assert moved["ema99"] < moved["none"]
    assert max(float((results["ema99"][k] - results["none"][k]).abs().max()) for k in before) > 1e-4


def test_fp16_variant_loads_and_trains_in_fp32(digits_dir, tmp_path):
    from diffusers import DDPMScheduler

    from conftest import make_unet

    pipe_dir = tmp_path / "pipe"
    DDPMPipeline(unet=make_unet().half(), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(
        pipe_dir, variant="fp16")
    assert (pipe_dir / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    trainer = run(parse_args(args(str(pipe_dir), digits_dir, tmp_path / "out", "--variant", "fp16",
                                      "--num_shards", 2, "--num_rounds", 1, "--local_steps", 1)))
    assert trainer.denoiser.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in unet_weights(tmp_path / "out").values())


def test_options_reach_the_trainer(tiny_pipeline, digits_dir, tmp_path):
    """Options tested as pure rules elsewhere must also be what the trainer uses."""
    from memmit.data.split import split_shards
    from memmit.train.ensemble import shard_weights

    trainer = build_trainer(parse_args(args(
        tiny_pipeline, digits_dir, tmp_path / "out", "--num_shards", 3, "--aggregation", "uniform",
        "--agc_bank_decay", 0.3, "--agc_bank_init", "zero", "--dedup", "none", "--agc_bank_bins", 20,
        "--shard_strategy", "stratified", "--label_column", "label", "--seed", 5, "--adam_beta1", 0.8,
        "--adam_beta2", 0.95, "--adam_weight_decay", 0.1, "--adam_epsilon", 1e-6, "--learning_rate", 3e-4)))
    labels = load_train_dataset(dataset_name=digits_dir)["label"]
    assert trainer.split.shards == split_shards(24, 3, "stratified", 5, labels)
    assert trainer.weights == shard_weights([len(s) for s in trainer.split.shards], "uniform")
    bank = trainer.shards[0].bank
    assert bank.decay == 0.3 and bool(bank.is_set.all())  # zero init: every entry starts set, at 0
    assert bank.values.shape == (20,) and bank.num_timesteps == trainer.task.num_train_timesteps
    trainer.shards[0].open(trainer.model.params, None)
    group = trainer.shards[0].optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (3e-4, (0.8, 0.95), 0.1, 1e-6)


def test_agc_exclusion_leaves_repeatedly_skipped_samples_out_and_resumes_exactly(tiny_pipeline, digits_dir, tmp_path):
    import csv
    import json
    import shutil

    common = ["--num_shards", 2, "--num_rounds", 3, "--local_epochs", 2, "--agc_lambda", 0.9, "--dedup", "none",
              "--agc_exclusion", 0.5, "--agc_exclusion_min_visits", 2, "--checkpoints_total_limit", 5]
    out = tmp_path / "out"
    run(parse_args(args(tiny_pipeline, digits_dir, out, *common)))
    excluded = {int(i): v for i, v in json.loads((out / "memmit" / "excluded.json").read_text()).items()}
    with open(out / "memmit" / "candidates.csv") as f:
        rows = {int(r["sample_id"]): r for r in csv.DictReader(f)}
    assert 0 < len(excluded) < 24
    for i, r in rows.items():
        seen, skipped = int(r["seen"]), int(r["skipped"])
        if i in excluded:
            e = excluded[i]
            # Judged on its counts then, and never visited again.
            assert e["seen"] >= 2 and 2 * e["skipped"] >= e["seen"]
            assert (seen, skipped) == (e["seen"], e["skipped"]) and r["excluded_after_round"] == str(e["round"])
        else:
            assert seen < 2 or 2 * skipped < seen, r
    # Exclusions after round 0 changed what round 1 trained on; resuming from that round's end repeats it exactly.
    assert any(e["round"] == 0 for e in excluded.values())
    first = min((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    again = tmp_path / "again"
    shutil.copytree(out / "checkpoints", again / "checkpoints")
    reset_accelerator()
    run(parse_args(args(tiny_pipeline, digits_dir, again, *common,
                            "--resume_from_checkpoint", again / "checkpoints" / first.name)))
    a, b = unet_weights(out), unet_weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "memmit" / "excluded.json").read_text() == (out / "memmit" / "excluded.json").read_text()
