"""The loop's arithmetic and its guards: AGC's reduction over an accumulation window, resume that refuses
changed settings, non-finite losses, overwrite, and logs that reach the trackers."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMPipeline

from memmit.cli import run, train_main
from memmit.config import MemmitConfig, parse_args
from memmit.data.dataset import load_train_dataset
from memmit.data.transform import ImageTransform
from memmit.train.setup import build_trainer

from conftest import noise_generator, save_pipeline
from conftest import reset_accelerator
from test_train import args, unet_weights


def hand_agc_run(pipe_dir: str, data_dir: str, bank_start: float, agc_lambda: float, batch: int, accumulation: int,
                 steps: int, lr: float, seed: int, reduction: str) -> tuple[dict, list[list[int]]]:
    """K = 1 written out: the shard's draws (its order; each sample's noise then timestep from its own generator),
    the target the scheduler's prediction_type names (the noise, or v), the AGC rule on a bank that starts at
    `bank_start` everywhere, and one AdamW step per window on the concatenated window. reduction "window": mean
    over the window's kept samples; "micro": the mean of micro-batch means."""
    pipe = DDPMPipeline.from_pretrained(pipe_dir)
    unet, sched = pipe.unet.train(), pipe.scheduler
    images = load_train_dataset(dataset_name=data_dir)["image"]
    transform = ImageTransform(16, 1, center_crop=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2, eps=1e-4)
    gen = torch.Generator().manual_seed(seed + 1000)
    order = torch.randperm(len(images), generator=gen).tolist()
    bank = torch.full((sched.config.num_train_timesteps,), bank_start)
    kept_per_micro, cursor = [], 0
    for _ in range(steps):
        x0, noise, t = [], [], []
        for _ in range(accumulation):
            x0.append(torch.stack([transform(images[i]) for i in order[cursor:cursor + batch]]))
            for position in range(cursor, cursor + batch):  # all in epoch 0
                sample = noise_generator(seed, 0, 0, position)
                noise.append(torch.randn((1, 16, 16), generator=sample))
                t.append(torch.randint(0, sched.config.num_train_timesteps, (), generator=sample))
            cursor += batch
        x0, noise, t = torch.cat(x0), torch.stack(noise), torch.stack(t)
        target = {"epsilon": noise, "sample": x0}.get(sched.config.prediction_type)
        target = sched.get_velocity(x0, noise, t) if target is None else target
        losses = (unet(sched.add_noise(x0, noise, t), t).sample - target).pow(2).flatten(1).mean(1)
        keep = []
        for i, (loss, step) in enumerate(zip(losses.tolist(), t.tolist())):
            keep.append(loss >= agc_lambda * bank[step].item())
            bank[step] = 0.8 * bank[step] + (1 - 0.8) * loss
        keep = torch.tensor(keep)
        if reduction == "window":
            loss = losses[keep].mean()
        else:
            parts = [(losses[j:j + batch], keep[j:j + batch]) for j in range(0, len(losses), batch)]
            loss = sum(l[k].mean() for l, k in parts if k.any()) / accumulation
        kept_per_micro.append([int(keep[j:j + batch].sum()) for j in range(0, len(keep), batch)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}, kept_per_micro


def test_agc_step_loss_is_the_mean_over_the_kept_samples_of_the_whole_accumulation_window(
        tiny_pipeline, digits_dir, tmp_path):
    flags = args(tiny_pipeline, digits_dir, tmp_path / "out", "--num_shards", 1, "--num_rounds", 1, "--local_steps", 3,
                 "--gradient_accumulation_steps", 2, "--train_batch_size", 3, "--agc_lambda", 1.0, "--dedup", "none",
                 "--center_crop", "--max_grad_norm", "none", "--learning_rate", 1e-3, "--num_validation_images", 0,
                 # A large epsilon: Adam would otherwise blow float noise in ~zero gradients (biases before a
                 # GroupNorm) up to lr-sized steps.
                 "--adam_epsilon", 1e-4)
    trainer = build_trainer(parse_args(flags))
    bank = trainer.shards[0].bank
    bank.values.fill_(1.0)
    bank.is_set.fill_(True)
    trainer.train()
    got = {k: v.detach().cpu() for k, v in trainer.denoiser.state_dict().items()}

    common = dict(bank_start=1.0, agc_lambda=1.0, batch=3, accumulation=2, steps=3, lr=1e-3, seed=0)
    want, kept = hand_agc_run(tiny_pipeline, digits_dir, reduction="window", **common)
    # The case that tells the reductions apart: micro-batches of one window keep different numbers of samples.
    assert any(a != b for a, b in kept), kept
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    wrong, _ = hand_agc_run(tiny_pipeline, digits_dir, reduction="micro", **common)
    assert max(float((got[k] - wrong[k]).abs().max()) for k in got) > 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_type_accumulation_and_checkpointing_match_the_written_out_loop(digits_dir, tmp_path,
                                                                                 prediction_type):
    """The loss target follows the scheduler's prediction_type, a window of 2 micro-batches is one step on their
    mean, and gradient checkpointing recomputes what it drops exactly: the weights are the written-out loop's."""
    pipe = save_pipeline(tmp_path / "pipe", prediction_type=prediction_type)
    flags = args(pipe, digits_dir, tmp_path / "out", "--num_shards", 1, "--num_rounds", 1, "--local_steps", 3,
                 "--gradient_accumulation_steps", 2, "--train_batch_size", 3, "--agc_lambda", 0, "--dedup", "none",
                 "--center_crop", "--max_grad_norm", "none", "--learning_rate", 1e-3, "--num_validation_images", 0,
                 "--adam_epsilon", 1e-4, "--gradient_checkpointing")
    trainer = run(parse_args(flags))
    got = {k: v.detach().cpu() for k, v in trainer.denoiser.state_dict().items()}
    want, _ = hand_agc_run(pipe, digits_dir, bank_start=0.0, agc_lambda=0.0, batch=3, accumulation=2, steps=3,
                           lr=1e-3, seed=0, reduction="window")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert DDPMPipeline.from_pretrained(tmp_path / "out").scheduler.config.prediction_type == prediction_type


def resume_flags(pipe, data, out, *extra):
    return args(pipe, data, out, "--num_shards", 2, "--num_rounds", 2, "--local_steps", 2, "--checkpointing_steps", 1,
                "--num_validation_images", 0, *extra)


def test_resume_refuses_changed_arithmetic_and_records_changed_free_options(tiny_pipeline, digits_dir, tmp_path,
                                                                          capsys):
    out = tmp_path / "out"
    run(parse_args(resume_flags(tiny_pipeline, digits_dir, out)))
    config_before = (out / "memmit" / "config.yaml").read_text()
    first = min((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    reset_accelerator()

    changed = resume_flags(tiny_pipeline, digits_dir, out, "--resume_from_checkpoint", first, "--learning_rate", 3e-4,
                           "--seed", 7, "--checkpointing_steps", 2)
    assert train_main(changed) == 2
    err = capsys.readouterr().err
    assert err.count("memmit: error:") == 1
    assert "learning_rate: 0.0001 in the checkpoint, 0.0003 now" in err and "seed: 0 in the checkpoint, 7 now" in err
    assert "checkpointing_steps" not in err  # not arithmetic: it may change
    assert (out / "memmit" / "config.yaml").read_text() == config_before
    reset_accelerator()

    # Free options may change; the run continues and says what changed.
    again = resume_flags(tiny_pipeline, digits_dir, out, "--resume_from_checkpoint", first, "--checkpointing_steps", 3,
                         "--report_to", "tensorboard")
    assert train_main(again) == 0
    record = json.loads((out / "memmit" / "resumes.jsonl").read_text().splitlines()[-1])
    assert record["changed"] == {"checkpointing_steps": [1, 3], "report_to": ["none", "tensorboard"]}


def test_resume_on_changed_data_is_one_clean_error(tiny_pipeline, tmp_path, capsys):
    import datasets

    from conftest import mnist_images

    images, labels = mnist_images(12)
    data = tmp_path / "data"
    datasets.Dataset.from_dict({"image": images[:10], "label": labels[:10]}).save_to_disk(str(data))
    out = tmp_path / "out"
    run(parse_args(resume_flags(str(tiny_pipeline), str(data), out)))
    reset_accelerator()
    datasets.Dataset.from_dict({"image": images, "label": labels}).save_to_disk(str(tmp_path / "data2"))
    datasets.load_from_disk(str(tmp_path / "data2")).save_to_disk(str(data))
    assert train_main(resume_flags(str(tiny_pipeline), str(data), out, "--resume_from_checkpoint", "latest")) == 2
    err = capsys.readouterr().err
    assert err.count("memmit: error:") == 1 and "Traceback" not in err
    assert "the training data changed since it was written (sample 10 (index 10) was added (12 samples now, 10 then))" \
        in err


def test_nonfinite_losses_stop_the_run_with_a_clear_message(digits_dir, tmp_path, capsys):
    pipe_dir = tmp_path / "nan-pipe"
    save_pipeline(pipe_dir)
    pipe = DDPMPipeline.from_pretrained(pipe_dir)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))  # every prediction, so every loss, is NaN
    pipe.save_pretrained(pipe_dir)
    out = tmp_path / "out"
    assert train_main(args(str(pipe_dir), digits_dir, out, "--num_shards", 1, "--num_rounds", 1, "--local_epochs", 3,
                           "--num_validation_images", 0)) == 1
    err = capsys.readouterr().err
    assert "training stopped: 10 optimizer steps in a row had non-finite losses" in err
    assert not (out / "model_index.json").exists()


def test_nonfinite_losses_are_counted_and_leave_the_gradient_and_the_bank_alone(digits_dir, tmp_path):
    """A scheduler whose noise level is undefined at t < 5 (alphas_cumprod > 1: sqrt of a negative) gives
    NaN losses at those timesteps only: they are counted per sample, never kept, never banked."""
    import csv

    from diffusers import DDPMScheduler

    from conftest import make_unet

    betas = [-0.05, 0.0, 0.0, 0.0, 0.0, 0.1] + torch.linspace(1e-3, 0.02, 44).tolist()
    pipe_dir = tmp_path / "pipe"
    DDPMPipeline(unet=make_unet(), scheduler=DDPMScheduler(num_train_timesteps=50, trained_betas=betas)
                 ).save_pretrained(pipe_dir)
    out = tmp_path / "out"
    trainer = run(parse_args(args(str(pipe_dir), digits_dir, out, "--num_shards", 1, "--num_rounds", 2,
                                  "--local_epochs", 2, "--dedup", "none", "--num_validation_images", 0)))
    with open(out / "memmit" / "candidates.csv") as f:
        rows = [r for r in csv.DictReader(f)]
    nonfinite = sum(int(r["nonfinite"]) for r in rows)
    assert 0 < nonfinite < sum(int(r["seen"]) for r in rows) // 4
    assert all(int(r["skipped"]) + int(r["nonfinite"]) <= int(r["seen"]) for r in rows)
    bank = trainer.shards[0].bank
    assert not bank.is_set[:5].any() and bank.is_set[5:].any() and torch.isfinite(bank.values).all()
    assert all(torch.isfinite(v).all() for v in unet_weights(out).values())


def test_overwrite_output_dir_removes_every_file_of_the_previous_run(tiny_pipeline, digits_dir, tmp_path):
    out = tmp_path / "out"
    run(parse_args(args(tiny_pipeline, digits_dir, out, "--num_shards", 2, "--num_rounds", 2, "--local_steps", 1,
                        "--agc_exclusion", 0.5, "--agc_exclusion_min_visits", 1, "--agc_lambda", 0.99)))
    assert (out / "memmit" / "excluded.json").is_file() and (out / "memmit" / "duplicates.json").is_file()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"a previous --export lora")
    reset_accelerator()
    run(parse_args(args(tiny_pipeline, digits_dir, out, "--num_shards", 3, "--num_rounds", 1, "--local_steps", 1,
                        "--dedup", "none", "--overwrite_output_dir")))
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts)
    assert left == ["README.md", "memmit/candidates.csv", "memmit/config.yaml", "memmit/shards.json",
                    "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                    "unet/diffusion_pytorch_model.safetensors"]


def test_checkpoints_are_limited_by_default_and_their_size_is_logged(tiny_pipeline, digits_dir, tmp_path, caplog):
    import logging

    assert MemmitConfig.__dataclass_fields__["checkpoints_total_limit"].default == 3
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        run(parse_args(args(tiny_pipeline, digits_dir, out, "--num_shards", 2, "--num_rounds", 2, "--local_steps", 2,
                            "--checkpointing_steps", 1, "--num_validation_images", 0)))
    assert len(list((out / "checkpoints").glob("checkpoint-*"))) == 3
    assert any("MiB" in r.getMessage() and "optimizer state of 2 shards" in r.getMessage() for r in caplog.records)
