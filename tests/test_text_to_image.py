"""Text-to-image (Stable Diffusion) task on a tiny real pipeline and captioned real digits."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from memmit.cli import train_main
from memmit.config import parse_args
from memmit.families import load_task
from memmit.families.inputs import tokenize
from memmit.families.stable_diffusion import TextToImageTask
from memmit.cli import run

from conftest import save_sd_pipeline
from test_train import args


def weights(root, part: str) -> dict:
    return load_file(next((Path(root) / part).glob("*.safetensors")))


def make_task(pipe, data, *extra) -> TextToImageTask:
    task = load_task(parse_args(args(pipe, data, "unused", "--caption_column", "text", *extra)))
    assert isinstance(task, TextToImageTask)
    return task


def rows(data, n: int = 6) -> dict:
    return datasets.load_from_disk(data)[:n]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def generators(seed: int, n: int) -> list[torch.Generator]:
    """One generator per sample, as the trainer gives the task (any distinct seeds do here)."""
    return [seeded(1000 * seed + i) for i in range(n)]


def test_end_to_end_exports_a_stable_diffusion_pipeline_that_generates(tiny_sd_pipeline, captioned_digits_dir,
                                                                        tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    flags = args(tiny_sd_pipeline, captioned_digits_dir, out, "--caption_column", "text", "--num_shards", 2,
                 "--num_rounds", 2, "--num_validation_images", 2, "--validation_inference_steps", 2,
                 "--validation_prompts", "a handwritten digit 3")
    flags[flags.index("--report_to") + 1] = "tensorboard"
    run(parse_args(flags))

    assert yaml.safe_load((out / "memmit" / "config.yaml").read_text())["agc_lambda"] == 0.8
    assert type(DiffusionPipeline.from_pretrained(out)) is StableDiffusionPipeline
    before, after = weights(tiny_sd_pipeline, "unet"), weights(out, "unet")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for frozen in ("vae", "text_encoder"):
        original, saved = weights(tiny_sd_pipeline, frozen), weights(out, frozen)
        assert original.keys() == saved.keys() and all(torch.equal(original[k], saved[k]) for k in original)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    images = pipe("a handwritten digit 3", num_inference_steps=2, height=16, width=16, generator=seeded(),
                  output_type="np").images
    assert images.shape == (1, 16, 16, 3) and images.std() > 0
    logged = [EventAccumulator(str(p.parent)).Reload() for p in (out / "logs").rglob("events.out.tfevents*")]
    assert [e.step for run in logged if "samples" in run.Tags()["images"] for e in run.Images("samples")] == [1, 2]


def test_a_list_of_captions_trains_and_the_choice_follows_the_generator(tiny_sd_pipeline, captioned_digits_dir,
                                                                         tmp_path):
    task = make_task(tiny_sd_pipeline, captioned_digits_dir, "--caption_column", "captions")
    data = rows(captioned_digits_dir)
    choices = [task.inputs(data, generators(seed, 6))["input_ids"] for seed in range(4)]
    assert torch.equal(choices[0], task.inputs(data, generators(0, 6))["input_ids"])
    assert any(not torch.equal(choices[0], other) for other in choices[1:])
    for ids, captions in zip(choices[0], data["captions"]):
        assert any(torch.equal(ids, option) for option in tokenize(task.text.tokenizers, task.text.lengths(), captions)["input_ids"])

    out = tmp_path / "out"
    run(parse_args(args(tiny_sd_pipeline, captioned_digits_dir, out, "--caption_column", "captions",
                            "--num_shards", 2, "--num_rounds", 1, "--local_steps", 1)))
    assert type(DiffusionPipeline.from_pretrained(out)) is StableDiffusionPipeline


def test_caption_dropout_one_trains_on_the_empty_prompt_only(tiny_sd_pipeline, captioned_digits_dir):
    task = make_task(tiny_sd_pipeline, captioned_digits_dir, "--caption_dropout", 1.0)
    ids = task.inputs(rows(captioned_digits_dir), generators(0, 6))["input_ids"]
    assert torch.equal(ids, tokenize(task.text.tokenizers, task.text.lengths(), [""])["input_ids"].expand_as(ids))


def test_empty_or_missing_captions_are_the_empty_prompt_and_bad_ones_are_named(tiny_sd_pipeline, captioned_digits_dir):
    task = make_task(tiny_sd_pipeline, captioned_digits_dir)
    data = rows(captioned_digits_dir, 3)
    data["text"] = ["", None, "a handwritten digit"]
    batch = task.inputs(data, generators(0, 3))
    empty = tokenize(task.text.tokenizers, task.text.lengths(), [""])["input_ids"][0]
    assert torch.equal(batch["input_ids"][0], empty) and torch.equal(batch["input_ids"][1], empty)
    assert not torch.equal(batch["input_ids"][2], empty)
    out = task.per_sample_loss(task.denoiser, batch, generators(1, 3), torch.device("cpu"))
    assert out.losses.shape == (3,) and torch.isfinite(out.losses).all() and out.weights is None

    data["text"] = [7, "a", "b"]
    with pytest.raises(ValueError, match="caption_column 'text' holds 7 of type int"):
        task.inputs(data, generators(0, 3))


@pytest.mark.parametrize("flags, message", [
    (["--caption_column", "caption"], "column 'caption' not in dataset columns ['image', 'label', 'text', 'captions']"),
    ([], "caption_column is required for text-to-image pipelines"),
])
def test_bad_caption_options_fail_before_training(tiny_sd_pipeline, captioned_digits_dir, tmp_path, capsys,
                                                  flags, message):
    out = tmp_path / "out"
    assert train_main(args(tiny_sd_pipeline, captioned_digits_dir, out, *flags)) == 2
    assert message in capsys.readouterr().err
    assert not (out / "model_index.json").exists()


@pytest.mark.parametrize("break_pipeline, message", [
    (lambda pipe: setattr(pipe, "text_encoder", None), "has no text_encoder"),
    (lambda pipe: pipe.unet.register_to_config(in_channels=9), "takes 9 input channels"),
    (lambda pipe: pipe.unet.register_to_config(addition_embed_type="text_time"), "more than one text encoder"),
])
def test_conditional_pipelines_this_task_cannot_train_are_refused(tiny_sd_pipeline, break_pipeline, message):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline)
    break_pipeline(pipe)
    with pytest.raises(ValueError, match=message):
        TextToImageTask(pipe, caption_column="text")


def reference_loss(pipe_dir: str, batch: dict, seed: int, text_noise: float = 0.0, noisiest: float = 1.0,
                   teacher=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample loss, timesteps and SNR written out from the schedule's alphas_cumprod, on a fresh load.
    Sample i draws from its own generator: its latent, then (`text_noise`: GNI of that std) its text-embedding
    noise, its noise, its timestep. A sample `batch["anchored"]` marks has the UNet's prediction under its
    anchor prompt (`batch["anchor_ids"]`) as its target, at timestep T - n + floor(t * n / T) of the n = T *
    `noisiest` noisiest (highest) ones. With a `teacher` UNet, the other samples' target is its prediction."""
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    with torch.no_grad():
        dist = pipe.vae.encode(batch["pixels"]).latent_dist
        text = pipe.text_encoder(batch["input_ids"])[0]
        latents, texts, noise, t = [], [], [], []
        for i, gen in enumerate(generators(seed, len(text))):
            latents.append(dist.mean[i] + dist.std[i] * torch.randn(dist.mean.shape[1:], generator=gen))
            texts.append(text[i] + text_noise * torch.randn(text.shape[1:], generator=gen) if text_noise else text[i])
            noise.append(torch.randn(dist.mean.shape[1:], generator=gen))
            t.append(torch.randint(0, pipe.scheduler.config.num_train_timesteps, (), generator=gen))
        latents, text = torch.stack(latents) * pipe.vae.config.scaling_factor, torch.stack(texts)
        noise, t = torch.stack(noise), torch.stack(t)
        if "anchored" in batch:
            steps = pipe.scheduler.config.num_train_timesteps
            span = int(noisiest * steps)
            t = torch.where(batch["anchored"], steps - span + t * span // steps, t)
        alpha_bar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        if pipe.scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
        pred = pipe.unet(noisy, t, encoder_hidden_states=text).sample
        if teacher is not None:
            target = teacher(noisy, t, encoder_hidden_states=text).sample
        if "anchored" in batch:
            anchor_text = pipe.text_encoder(batch["anchor_ids"])[0]
            anchored = pipe.unet(noisy, t, encoder_hidden_states=anchor_text).sample
            target = torch.where(batch["anchored"].view(-1, 1, 1, 1), anchored, target)
    return (pred - target).pow(2).mean(dim=(1, 2, 3)), t, (alpha_bar / (1 - alpha_bar)).flatten()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_target_and_min_snr_weights_match_a_written_out_computation(captioned_digits_dir, tmp_path,
                                                                         prediction_type):
    pipe_dir = save_sd_pipeline(tmp_path / "pipe", prediction_type=prediction_type)
    gamma = 5.0
    plain, weighted = make_task(pipe_dir, captioned_digits_dir), make_task(pipe_dir, captioned_digits_dir,
                                                                           "--snr_gamma", gamma)
    batch = plain.inputs(rows(captioned_digits_dir, 8), generators(1, 8))
    cpu = torch.device("cpu")
    with torch.no_grad():
        out_plain = plain.per_sample_loss(plain.denoiser, batch, generators(2, 8), cpu)
        out = weighted.per_sample_loss(plain.denoiser, batch, generators(2, 8), cpu)
    loss, t, snr = reference_loss(pipe_dir, batch, seed=2)

    assert torch.equal(out.timesteps, t) and out_plain.weights is None
    torch.testing.assert_close(out.losses, loss)
    assert torch.equal(out.losses, out_plain.losses), "min-SNR must not change the losses AGC reads"
    expected = snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(out.weights, expected)
    assert (snr > gamma).any() and (snr < gamma).any(), "the draw should exercise both sides of the clamp"


def test_text_embedding_noise_matches_a_written_out_computation(tiny_sd_pipeline, captioned_digits_dir):
    noisy = make_task(tiny_sd_pipeline, captioned_digits_dir, "--text_embedding_noise", 0.5)
    batch = noisy.inputs(rows(captioned_digits_dir, 8), generators(1, 8))
    with torch.no_grad():
        out = noisy.per_sample_loss(noisy.denoiser, batch, generators(2, 8), torch.device("cpu"))
    loss, t, _ = reference_loss(tiny_sd_pipeline, batch, seed=2, text_noise=0.5)
    assert torch.equal(out.timesteps, t)
    torch.testing.assert_close(out.losses, loss)
    clean, _, _ = reference_loss(tiny_sd_pipeline, batch, seed=2)
    assert not torch.allclose(out.losses, clean)


def test_bf16_runs_frozen_parts_in_bf16_and_keeps_the_unet_and_the_saved_parts_fp32(tiny_sd_pipeline,
                                                                                     captioned_digits_dir):
    task = make_task(tiny_sd_pipeline, captioned_digits_dir, "--mixed_precision", "bf16")
    task.prepare(torch.device("cpu"), torch.bfloat16)
    for frozen in (task.vae, *task.text.encoders):
        assert frozen.dtype == torch.bfloat16 and not frozen.training
        assert not any(p.requires_grad for p in frozen.parameters())
    assert task.pipeline.vae.dtype == task.pipeline.text_encoder.dtype == torch.float32

    batch = task.inputs(rows(captioned_digits_dir, 4), generators(0, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task.per_sample_loss(task.denoiser, batch, generators(1, 4), torch.device("cpu"))
    out.losses.mean().backward()
    assert out.losses.dtype == torch.float32
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in task.denoiser.parameters())

    images = task.sample(task.denoiser, 3, 2, seeded())
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0


def test_default_prompts_are_the_first_non_empty_training_captions(tiny_sd_pipeline, captioned_digits_dir):
    task = make_task(tiny_sd_pipeline, captioned_digits_dir)
    task.use_training_captions(["", None, ["a one", "a 1"], [], "a two", "a three", "a four", "a five"])
    assert task.default_prompts == ["a one", "a two", "a three", "a four"]


def test_the_denoiser_is_found_by_component_and_a_transformer_pipeline_is_named(tmp_path, tiny_sd_pipeline,
                                                                                captioned_digits_dir):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from memmit.families.base import denoiser_component

    task = make_task(tiny_sd_pipeline, captioned_digits_dir)
    assert task.denoiser_name == "unet" and task.denoiser is task.pipeline.unet
    # A real transformer pipeline: its denoiser is found, and the family is refused by name before training.
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=10)
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    dit = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    assert denoiser_component(dit) == "transformer"
    dit.save_pretrained(tmp_path / "dit")
    with pytest.raises(ValueError, match="pipeline DiTPipeline with a DiTTransformer2DModel is not supported yet"):
        load_task(parse_args(args(str(tmp_path / "dit"), captioned_digits_dir, "unused", "--caption_column", "text")))
    dit.transformer = None
    with pytest.raises(ValueError, match="DiTPipeline has neither a unet nor a transformer component"):
        denoiser_component(dit)
