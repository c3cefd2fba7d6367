"""SDXL (StableDiffusionXLPipeline) on a tiny real pipeline and captioned real digits: training full and LoRA,
the loss against a written-out computation, the micro-conditioning, the replacement VAE and bad pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from memmit.cli import train_main
from memmit.config import EvalConfig, parse_args
from memmit.data.transform import ImageTransform
from memmit.eval.detect import prompt_scores
from memmit.eval.sampling import load_eval_task, sample_generators
from memmit.families import load_task
from memmit.families.sdxl import StableDiffusionXLTask

from conftest import reset_accelerator, save_sdxl_pipeline, tiny_vae
from test_text_to_image import generators, rows, seeded, weights
from test_train import args

PROMPT = "a handwritten digit 3"


def make_task(pipe, data, *extra) -> StableDiffusionXLTask:
    task = load_task(parse_args(args(pipe, data, "unused", "--caption_column", "text", *extra)))
    assert isinstance(task, StableDiffusionXLTask)
    return task


def train(pipe, data, out, *extra) -> int:
    reset_accelerator()
    return train_main(args(pipe, data, out, "--caption_column", "text", "--num_shards", 2, "--num_rounds", 1,
                           "--learning_rate", "1e-2", "--validation_prompts", PROMPT, "--num_validation_images", 0,
                           *extra))


def render(pipe: StableDiffusionXLPipeline) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=2, height=16, width=16, generator=seeded(), output_type="np").images


def test_full_fine_tune_with_a_replacement_vae_reloads_generates_and_is_evaluated(tiny_sdxl_pipeline,
                                                                                 captioned_digits_dir, tmp_path):
    vae_dir = tmp_path / "fp16-safe-vae"
    tiny_vae(seed=1, force_upcast=False).save_pretrained(vae_dir)
    out = tmp_path / "out"
    assert train(tiny_sdxl_pipeline, captioned_digits_dir, out, "--pretrained_vae_model_name_or_path", vae_dir,
                 "--evaluate", "--eval_num_samples", 4, "--eval_num_inference_steps", 2, "--eval_batch_size", 4) == 0

    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    before, after = weights(tiny_sdxl_pipeline, "unet"), weights(out, "unet")
    # Every trainable parameter moved; what did not is exactly the fixed buffers.
    parameters = dict(pipe.unet.named_parameters())
    assert sorted(k for k in before if torch.equal(before[k], after[k])) == sorted(set(before) - set(parameters))
    for frozen in ("text_encoder", "text_encoder_2"):
        original, saved = weights(tiny_sdxl_pipeline, frozen), weights(out, frozen)
        assert all(torch.equal(original[k], saved[k]) for k in original)
    replacement, saved = weights(vae_dir, ""), weights(out, "vae")
    assert all(torch.equal(replacement[k], saved[k]) for k in replacement)  # the replacement VAE is the saved one
    images = render(pipe)
    assert images.shape == (1, 16, 16, 3) and images.std() > 0

    assert yaml.safe_load((out / "memmit" / "config.yaml").read_text())["agc_bank_bins"] is None  # per timestep
    for label in ("before", "after"):
        report = json.loads((out / "memmit" / "eval" / label / "report.json").read_text())
        assert report["settings"]["pipeline"] == "StableDiffusionXLPipeline" and report["pixel"]["num_samples"] == 4
    card = (out / "README.md").read_text()
    assert f'StableDiffusionXLPipeline.from_pretrained("{out.name}")' in card and f'pipe("{PROMPT}")' in card


def test_lora_shards_and_lora_export_load_with_load_lora_weights(tiny_sdxl_pipeline, captioned_digits_dir, tmp_path):
    """LoRA shards merged exactly; the exported LoRA (full rank), loaded into the original SDXL pipeline with
    load_lora_weights, renders what the merged export renders."""
    lora = ["--lora_rank", 4, "--num_rounds", 2]
    assert train(tiny_sdxl_pipeline, captioned_digits_dir, tmp_path / "full", *lora) == 0
    assert train(tiny_sdxl_pipeline, captioned_digits_dir, tmp_path / "lora", *lora, "--export", "lora",
                 "--export_lora_rank", 64) == 0
    summary = json.loads((tmp_path / "lora" / "memmit" / "lora_export.json").read_text())
    assert summary["relative_svd_error"] < 1e-5 and summary["pipeline_class"] == "StableDiffusionXLPipeline"

    merged = StableDiffusionXLPipeline.from_pretrained(tmp_path / "full")
    loaded = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline)
    untouched = render(loaded)
    loaded.load_lora_weights(tmp_path / "lora")
    np.testing.assert_allclose(render(loaded), render(merged), atol=1e-4)
    assert np.abs(render(merged) - untouched).max() > 1e-3  # the LoRA does change what it renders


def encode_written_out(pipe: StableDiffusionXLPipeline, ids: torch.Tensor, ids_2: torch.Tensor):
    """Both encoders' penultimate hidden states side by side, and the second's projected pooled output."""
    first = pipe.text_encoder(ids, output_hidden_states=True)
    second = pipe.text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def reference_loss(pipe_dir: str, batch: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss and timesteps written out on a fresh load: DDPM's forward process from the schedule's
    alphas_cumprod (whatever the pipeline samples with), both encoders' penultimate hidden states side by side,
    the second's projected pooled output, and the batch's time_ids. A sample `batch["anchored"]` marks has the UNet's
    prediction under its anchor prompt as its target."""
    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 50, dtype=torch.float32) ** 2  # scaled_linear
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)

    def encode(key: str):
        return encode_written_out(pipe, batch[key], batch[key + "_2"])

    with torch.no_grad():
        dist = pipe.vae.encode(batch["pixels"]).latent_dist
        latents, noise, t = [], [], []
        for i, gen in enumerate(generators(seed, len(batch["pixels"]))):
            latents.append(dist.mean[i] + dist.std[i] * torch.randn(dist.mean.shape[1:], generator=gen))
            noise.append(torch.randn(dist.mean.shape[1:], generator=gen))
            t.append(torch.randint(0, 50, (), generator=gen))
        latents, noise, t = torch.stack(latents) * pipe.vae.config.scaling_factor, torch.stack(noise), torch.stack(t)
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        text, pooled = encode("input_ids")
        cond = {"text_embeds": pooled, "time_ids": batch["time_ids"]}
        pred = pipe.unet(noisy, t, encoder_hidden_states=text, added_cond_kwargs=cond).sample
        target = noise
        if "anchored" in batch:
            text, pooled = encode("anchor_ids")
            anchored = pipe.unet(noisy, t, encoder_hidden_states=text,
                                 added_cond_kwargs={"text_embeds": pooled, "time_ids": batch["time_ids"]}).sample
            target = torch.where(batch["anchored"].view(-1, 1, 1, 1), anchored, target)
    return (pred - target).pow(2).mean(dim=(1, 2, 3)), t


def test_loss_matches_a_written_out_computation(tiny_sdxl_pipeline, captioned_digits_dir):
    task = make_task(tiny_sdxl_pipeline, captioned_digits_dir, "--random_flip")
    data = rows(captioned_digits_dir, 8)
    batch = task.inputs(data, generators(1, 8))
    # MNIST digits are 28 x 28, resized to 16 x 16: nothing to crop.
    assert batch["time_ids"].tolist() == [[28, 28, 0, 0, 16, 16]] * 8
    assert torch.equal(batch["input_ids_2"], batch["input_ids"])  # the tiny pipeline's tokenizers are alike
    with torch.no_grad():
        out = task.per_sample_loss(task.denoiser, batch, generators(2, 8), torch.device("cpu"))
    loss, t = reference_loss(tiny_sdxl_pipeline, batch, seed=2)
    assert torch.equal(out.timesteps, t)
    torch.testing.assert_close(out.losses, loss)

    # Anchored samples (dedup_captions=anchor) are conditioned on their anchor with their own time_ids.
    batch.update({key: torch.flip(batch[key.replace("anchor", "input")], [0]) for key in ("anchor_ids", "anchor_ids_2")},
                 anchored=torch.tensor([True, False] * 4), time_ids=batch["time_ids"] + torch.arange(8.0)[:, None])
    with torch.no_grad():
        out = task.per_sample_loss(task.denoiser, batch, generators(2, 8), torch.device("cpu"))
    loss, _ = reference_loss(tiny_sdxl_pipeline, batch, seed=2)
    torch.testing.assert_close(out.losses, loss)
    assert torch.equal(out.anchored, batch["anchored"])


def test_micro_conditioning_records_the_original_size_and_the_crop_of_the_mirrored_image():
    """A 40 x 20 image (w x h) at resolution 10: resized to 20 x 10, cropped 10 wide at a drawn left edge; mirrored,
    the crop's left edge is measured in the mirrored image."""
    img = Image.fromarray(np.arange(800, dtype=np.uint8).reshape(20, 40) % 251)
    resized = np.asarray(img.resize((20, 10), Image.BILINEAR), dtype=np.float32) / 127.5 - 1
    seen = set()
    for seed in range(12):
        x, (height, width, top, left) = ImageTransform(10, 1, random_flip=True).with_crop(img, seeded(seed))
        assert (height, width, top) == (20, 40, 0) and 0 <= left <= 10
        mirrored = resized[:, ::-1]
        flipped = np.array_equal(x[0].numpy(), mirrored[:, left:left + 10])
        assert flipped or np.array_equal(x[0].numpy(), resized[:, left:left + 10])
        seen.add(flipped)
    assert seen == {True, False}
    # A center crop's geometry, as --cache_latents computes it from the original size alone: 42 x 20 resizes to
    # 21 x 10, cropped at left 5, or 6 in the mirrored image.
    wide = Image.new("L", (42, 20))
    center = ImageTransform(10, 1, center_crop=True, random_flip=True)
    by_flip = {bool(torch.rand((), generator=seeded(seed)) < 0.5): seed for seed in range(8)}
    for flip, left in ((False, 5), (True, 6)):
        assert center.with_crop(wide, seeded(by_flip[flip]))[1] == center.center_crop_geometry(42, 20, flip) == \
            (20, 42, 0, left)


def test_fp16_keeps_an_upcast_vae_in_fp32_and_a_safe_one_in_fp16(tiny_sdxl_pipeline, captioned_digits_dir, tmp_path):
    task = make_task(tiny_sdxl_pipeline, captioned_digits_dir)
    task.prepare(torch.device("cpu"), torch.float16)
    assert task.vae.dtype == torch.float32 and all(e.dtype == torch.float16 for e in task.text.encoders)
    with torch.autocast("cpu", dtype=torch.float16):
        posterior = task.encode_pixels(task.inputs(rows(captioned_digits_dir, 2), generators(0, 2))["pixels"],
                                       torch.device("cpu"))
    assert posterior.mean.dtype == torch.float32  # outside autocast: SDXL's VAE overflows in fp16
    tiny_vae(seed=1, force_upcast=False).save_pretrained(tmp_path / "vae")
    safe = make_task(tiny_sdxl_pipeline, captioned_digits_dir, "--pretrained_vae_model_name_or_path", tmp_path / "vae")
    safe.prepare(torch.device("cpu"), torch.float16)
    assert safe.vae.dtype == torch.float16


def test_bad_sdxl_pipelines_and_options_are_named_before_training(tiny_sdxl_pipeline, captioned_digits_dir, tmp_path,
                                                                  capsys):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline)
    pipe.unet.register_to_config(cross_attention_dim=16)
    with pytest.raises(ValueError, match="cross_attention_dim 16 is not text_encoder's hidden_size 16 "
                                         r"\+ text_encoder_2's 8"):
        StableDiffusionXLTask(pipe, caption_column="text")

    without = save_sdxl_pipeline(tmp_path / "no-second-encoder", text_encoder_2=False)
    (tmp_path / "not-a-vae").mkdir()
    cases = [(without, [], "StableDiffusionXLPipeline has no text_encoder_2"),
             (tiny_sdxl_pipeline, ["--pretrained_vae_model_name_or_path", tmp_path / "not-a-vae"],
              "pretrained_vae_model_name_or_path"),
             (tiny_sdxl_pipeline, ["--lora_rank", 4, "--lora_target_modules", "to_x"], "to_x"),
             ]
    for pipe_dir, extra, message in cases:
        out = tmp_path / "out"
        assert train(pipe_dir, captioned_digits_dir, out, *extra) == 2, message
        assert message in capsys.readouterr().err
        assert not (out / "model_index.json").exists()


def test_prompt_detection_scores_the_written_out_guidance_gap(tiny_sdxl_pipeline, tmp_path):
    """memmit eval --detect_prompts on SDXL: the first step's conditional minus unconditional prediction, with
    the pooled embeddings and the sampling's time_ids (target size, no crop)."""
    config = EvalConfig(pretrained_model_name_or_path=tiny_sdxl_pipeline, output_dir=str(tmp_path),
                        detect_prompts=True, prompts_file="unused")
    prompts = [PROMPT, ""]
    scores = prompt_scores(load_eval_task(config), prompts, num_inference_steps=10, detect_steps=1, num_seeds=1,
                           seed=3, batch_size=2, device=torch.device("cpu"), show_progress=False)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]])

    def predict(x, prompt):
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        text, pooled = encode_written_out(pipe, ids, ids)
        return pipe.unet(x, t, encoder_hidden_states=text,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    with torch.no_grad():
        (generator,) = sample_generators(3, range(0, 1))
        x = torch.randn((1, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
        gap = predict(x, PROMPT) - predict(x, "")
    assert float(scores[0]) == pytest.approx(float(gap.norm()), rel=1e-4) and float(scores[1]) < 1e-5
