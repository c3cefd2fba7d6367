"""Flow-matching transformer pipelines (SD3, Flux) on tiny real pipelines and captioned real digits: training
full and LoRA, the loss against a written-out rectified-flow computation, resume, and bad pipelines."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

from memmit.cli import main, run, train_main
from memmit.config import EvalConfig, parse_args
from memmit.eval.detect import prompt_scores
from memmit.eval.sampling import load_eval_task, sample_generators
from memmit.families import load_task
from memmit.families.flux import FluxTask
from memmit.families.sd3 import StableDiffusion3Task
from memmit.families.inputs import tokenize

from conftest import reset_accelerator, save_flux_pipeline
from test_text_to_image import generators, rows, seeded, weights
from test_train import args

PROMPT = "a handwritten digit 3"
TOKENS = 32  # T5 tokens per prompt: the pipelines' 256 and 512 are slow to encode at this scale
FAMILIES = {"sd3": (StableDiffusion3Pipeline, StableDiffusion3Task), "flux": (FluxPipeline, FluxTask)}


def flags(pipe, data, out, *extra) -> list[str]:
    return args(pipe, data, out, "--caption_column", "text", "--resolution", 16, "--max_sequence_length", TOKENS,
                "--num_shards", 2, "--num_rounds", 1, "--learning_rate", "1e-2", "--validation_prompts", PROMPT,
                "--num_validation_images", 0, *extra)


def train(pipe, data, out, *extra) -> int:
    reset_accelerator()
    return train_main(flags(pipe, data, out, *extra))


def render(pipe) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=2, height=16, width=16, generator=seeded(), max_sequence_length=TOKENS,
                output_type="np").images


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_sd3_pipeline, tiny_flux_pipeline):
    """(family name, pipeline dir)."""
    return request.param, {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[request.param]


def test_full_and_lora_fine_tunes_reload_render_and_the_lora_export_loads(family, captioned_digits_dir, tmp_path):
    """K = 2 x 1 round, full and LoRA: reloaded with the family's pipeline class, rendered; the LoRA export (full
    rank) loaded into the original pipeline with load_lora_weights renders what the merged LoRA run renders."""
    name, pipe_dir = family
    pipeline_class = FAMILIES[name][0]
    assert train(pipe_dir, captioned_digits_dir, tmp_path / "full", "--evaluate", "--eval_num_samples", 4,
                 "--eval_num_inference_steps", 2, "--eval_batch_size", 4) == 0
    for label in ("before", "after"):  # memmit eval renders with the pipeline's own flow-matching sampler
        settings = json.loads((tmp_path / "full" / "memmit" / "eval" / label / "report.json").read_text())["settings"]
        assert (settings["pipeline"], settings["sampler"]) == (pipeline_class.__name__, "FlowMatchEulerDiscrete")
    saved = yaml.safe_load((tmp_path / "full" / "memmit" / "config.yaml").read_text())
    assert saved["agc_bank_bins"] == 50  # flow matching's measured default
    full = pipeline_class.from_pretrained(tmp_path / "full")
    before, after = weights(pipe_dir, "transformer"), weights(tmp_path / "full", "transformer")
    # Every trainable parameter moved; what did not is exactly the fixed buffers (SD3's sin-cos position table).
    parameters = dict(full.transformer.named_parameters())
    assert sorted(k for k in before if torch.equal(before[k], after[k])) == sorted(set(before) - set(parameters))
    assert render(full).shape == (1, 16, 16, 3) and render(full).std() > 0
    card = (tmp_path / "full" / "README.md").read_text()
    assert f'{pipeline_class.__name__}.from_pretrained("full")' in card and f'pipe("{PROMPT}")' in card

    lora = ["--lora_rank", 4]
    assert train(pipe_dir, captioned_digits_dir, tmp_path / "merged", *lora) == 0
    assert train(pipe_dir, captioned_digits_dir, tmp_path / "lora", *lora, "--export", "lora",
                 "--export_lora_rank", 64) == 0
    summary = json.loads((tmp_path / "lora" / "memmit" / "lora_export.json").read_text())
    assert summary["relative_svd_error"] < 1e-5 and summary["pipeline_class"] == pipeline_class.__name__
    loaded = pipeline_class.from_pretrained(pipe_dir)
    untouched = render(loaded)
    loaded.load_lora_weights(tmp_path / "lora")
    merged = render(pipeline_class.from_pretrained(tmp_path / "merged"))
    np.testing.assert_allclose(render(loaded), merged, atol=1e-4)
    assert np.abs(merged - untouched).max() > 1e-3  # the LoRA does change what it renders


def shifted_sigmas(shift: float) -> torch.Tensor:
    """The scheduler's 1000 training sigmas, noisiest first, shifted as its config says (SD3: 3; Flux, whose
    shift is dynamic at rendering only: none)."""
    s = torch.linspace(1, 1000, 1000).flip(0) / 1000
    return shift * s / (1 + (shift - 1) * s)


def reference_loss(name: str, pipe_dir: str, batch: dict, seed: int, scheme: str, logit=(0.0, 1.0),
                   mode_scale: float = 1.29, guidance: float = 3.5, noisiest: float = 1.0, **parts):
    """Per-sample loss, timestep index and weights written out on a fresh load: sample i draws its latent, its
    noise, then u (sigmoid of a normal, or uniform), the index floor(1000 u); x_t = (1 - sigma) x0 + sigma noise,
    target noise - x0. A sample `batch["anchored"]` marks has the transformer's prediction under its anchor
    prompt as its target, at index floor(index * n / 1000) of the n = 1000 * `noisiest` noisiest (lowest) indices.
    `parts`: components replaced at loading."""
    pipe = FAMILIES[name][0].from_pretrained(pipe_dir, **parts)
    vae = pipe.vae.config

    def encode(key: str):
        if name == "flux":  # T5's hidden states; CLIP's pooled output
            return pipe.text_encoder_2(batch[key + "_2"])[0], pipe.text_encoder(batch[key]).pooler_output
        l, g = (encoder(batch[k], output_hidden_states=True) for encoder, k in
                [(pipe.text_encoder, key), (pipe.text_encoder_2, key + "_2")])
        clip = torch.cat([l.hidden_states[-2], g.hidden_states[-2]], dim=-1)  # 24 wide, padded to T5's 32
        t5 = pipe.text_encoder_3(batch[key + "_3"])[0] if pipe.text_encoder_3 is not None else torch.zeros(
            len(clip), TOKENS, 32)
        return torch.cat([torch.nn.functional.pad(clip, (0, 8)), t5], dim=1), torch.cat([l.text_embeds, g.text_embeds], -1)

    def predict(x, sigma, key):
        text, pooled = encode(key)
        if name == "sd3":
            return pipe.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=text,
                                    pooled_projections=pooled).sample
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h // 2.0), torch.arange(w // 2.0),
                                         indexing="ij"), -1).reshape(-1, 3)
        out = pipe.transformer(hidden_states=packed, timestep=sigma, guidance=torch.full((b,), guidance),
                               pooled_projections=pooled, encoder_hidden_states=text, txt_ids=torch.zeros(TOKENS, 3),
                               img_ids=ids).sample
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    with torch.no_grad():
        dist = pipe.vae.encode(batch["pixels"]).latent_dist
        latents, noise, u = [], [], []
        for i, gen in enumerate(generators(seed, len(batch["pixels"]))):
            latents.append(dist.mean[i] + dist.std[i] * torch.randn(dist.mean.shape[1:], generator=gen))
            noise.append(torch.randn(dist.mean.shape[1:], generator=gen))
            if scheme == "logit_normal":
                u.append(torch.sigmoid(torch.normal(*logit, (1,), generator=gen)))
            else:
                r = torch.rand((1,), generator=gen)
                # The mode density (SD3 paper) maps a uniform draw; u = 1 is the last index.
                u.append((1 - r - mode_scale * (torch.cos(torch.pi * r / 2) ** 2 - 1 + r)).clamp(max=0.9999)
                         if scheme == "mode" else r)
        x0 = (torch.stack(latents) - vae.shift_factor) * vae.scaling_factor
        noise, index = torch.stack(noise), (torch.cat(u) * 1000).long()
        if "anchored" in batch:
            index = torch.where(batch["anchored"], index * int(noisiest * 1000) // 1000, index)
        sigmas = shifted_sigmas(3.0 if name == "sd3" else 1.0)[index]
        sigma = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        pred, target = predict(noisy, sigmas, "input_ids"), noise - x0
        if "anchored" in batch:
            target = torch.where(batch["anchored"].view(-1, 1, 1, 1), predict(noisy, sigmas, "anchor_ids"), target)
    return (pred - target).pow(2).mean(dim=(1, 2, 3)), index, sigmas


def test_loss_matches_a_written_out_rectified_flow_computation(family, captioned_digits_dir):
    name, pipe_dir = family
    # Options away from their defaults: a task that ignored them would draw other timesteps or guide otherwise.
    options = {"sd3": ["--logit_mean", 0.5, "--logit_std", 0.7], "flux": ["--guidance_scale", 2.0]}[name]
    task = load_task(parse_args(flags(pipe_dir, captioned_digits_dir, "unused", *options)))
    assert isinstance(task, FAMILIES[name][1]) and task.num_train_timesteps == 1000
    batch = task.inputs(rows(captioned_digits_dir, 8), generators(1, 8))
    anchored = torch.tensor([True, False, False, False] * 2)
    batch.update(tokenize(task.text.tokenizers, task.text.lengths(), ["digit 7 written by hand"] * 8, "anchor_ids"),
                 anchored=anchored)
    with torch.no_grad():
        out = task.per_sample_loss(task.denoiser, batch, generators(2, 8), torch.device("cpu"))
    # Each family's diffusers example's timesteps: SD3 logit-normal, Flux uniform.
    assert batch["input_ids_3" if name == "sd3" else "input_ids_2"].shape == (8, TOKENS)  # --max_sequence_length
    loss, index, _ = reference_loss(name, pipe_dir, batch, seed=2, scheme="logit_normal" if name == "sd3" else "none",
                                    logit=(0.5, 0.7), guidance=2.0)
    assert torch.equal(out.timesteps, index)
    torch.testing.assert_close(out.losses, loss)
    assert torch.equal(out.anchored, anchored) and (loss[anchored] > 1e-6).all()
    # dedup_anchor_noisiest: the anchored samples' indices move into the noisiest 30 % (sigma falls as they grow).
    squeezed = load_task(parse_args(flags(pipe_dir, captioned_digits_dir, "unused", *options,
                                          "--dedup_anchor_noisiest", 0.3)))
    with torch.no_grad():
        out = squeezed.per_sample_loss(squeezed.denoiser, batch, generators(2, 8), torch.device("cpu"))
    loss, moved, _ = reference_loss(name, pipe_dir, batch, seed=2, scheme="logit_normal" if name == "sd3" else "none",
                                    logit=(0.5, 0.7), guidance=2.0, noisiest=0.3)
    assert torch.equal(out.timesteps, moved) and (moved[anchored] < 300).all()
    assert torch.equal(moved[~anchored], index[~anchored]) and not torch.equal(moved, index)
    torch.testing.assert_close(out.losses, loss)
    # logit_normal and none weight every sample alike; anchored ones by dedup_anchor_weight (16, the default).
    assert torch.equal(out.weights, torch.where(anchored, 16.0, 1.0))


def test_the_mode_density_draws_its_timesteps(tiny_sd3_pipeline, captioned_digits_dir):
    task = load_task(parse_args(flags(tiny_sd3_pipeline, captioned_digits_dir, "unused", "--weighting_scheme", "mode",
                                      "--mode_scale", 1.1)))
    batch = task.inputs(rows(captioned_digits_dir, 8), generators(1, 8))
    with torch.no_grad():
        out = task.per_sample_loss(task.denoiser, batch, generators(2, 8), torch.device("cpu"))
    loss, index, _ = reference_loss("sd3", tiny_sd3_pipeline, batch, seed=2, scheme="mode", mode_scale=1.1)
    assert torch.equal(out.timesteps, index) and out.weights is None
    torch.testing.assert_close(out.losses, loss)


def test_sigma_sqrt_weighting_and_an_sd3_without_t5(tiny_sd3_pipeline, captioned_digits_dir):
    """weighting_scheme=sigma_sqrt: uniform timesteps, weights sigma^-2 (AGC reads the unweighted loss); an SD3
    pipeline loaded without text_encoder_3 trains on zeros in T5's place, as the pipeline renders."""
    without_t5 = {"text_encoder_3": None, "tokenizer_3": None}
    task = StableDiffusion3Task(StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline, **without_t5),
                                resolution=16, caption_column="text", max_sequence_length=TOKENS,
                                weighting_scheme="sigma_sqrt")
    batch = task.inputs(rows(captioned_digits_dir, 8), generators(1, 8))
    assert "input_ids_3" not in batch
    with torch.no_grad():
        out = task.per_sample_loss(task.denoiser, batch, generators(2, 8), torch.device("cpu"))
    loss, index, sigmas = reference_loss("sd3", tiny_sd3_pipeline, batch, seed=2, scheme="none", **without_t5)
    assert torch.equal(out.timesteps, index)
    torch.testing.assert_close(out.losses, loss)
    torch.testing.assert_close(out.weights, sigmas ** -2)
    images = task.sample(task.denoiser, 2, 2, seeded())  # the round-end samples render without T5 too
    assert images.shape == (2, 3, 16, 16) and images.std() > 0


def test_resume_from_mid_round_is_bit_identical(tiny_sd3_pipeline, captioned_digits_dir, tmp_path):
    common = ["--num_rounds", 2, "--local_epochs", 2, "--agc_lambda", 0.9, "--agc_bank_bins", 20, "--random_flip",
              "--checkpointing_steps", 1, "--checkpoints_total_limit", 30]
    out = tmp_path / "out"
    reset_accelerator()
    run(parse_args(flags(tiny_sd3_pipeline, captioned_digits_dir, out, *common)))
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    again = tmp_path / "again"
    shutil.copytree(out / "checkpoints", again / "checkpoints")
    reset_accelerator()
    run(parse_args(flags(tiny_sd3_pipeline, captioned_digits_dir, again, *common,
                         "--resume_from_checkpoint", again / "checkpoints" / checkpoints[2].name)))
    a, b = weights(out, "transformer"), weights(again, "transformer")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(out / "memmit" / "candidates.csv") as f:
        skipped = [int(r["skipped"]) for r in csv.DictReader(f)]
    assert sum(skipped) > 0  # AGC acted on the flow-matching losses
    assert (again / "memmit" / "candidates.csv").read_text() == (out / "memmit" / "candidates.csv").read_text()


def test_bad_flow_pipelines_and_options_are_named_before_training(tiny_sd3_pipeline, captioned_digits_dir, tmp_path,
                                                                  capsys):
    packed_wrong = save_flux_pipeline(tmp_path / "flux-8-channels", in_channels=8)
    cases = [(packed_wrong, [], "FluxPipeline's transformer in_channels 8 does not match 4 x the VAE's "
                                "latent_channels (Flux packs 2 x 2 latent patches), 16"),
             (tiny_sd3_pipeline, ["--lora_rank", 4, "--lora_target_modules", "to_x"], "to_x"),
             (tiny_sd3_pipeline, ["--snr_gamma", 5], "snr_gamma: min-SNR weighting is for DDPM-trained pipelines"),
             (tiny_sd3_pipeline, ["--resolution", 18], "resolution 18 must be a multiple of 4"),
             (tiny_sd3_pipeline, ["--weighting_scheme", "cosine"], "weighting_scheme='cosine' is not one of"),
             (tiny_sd3_pipeline, ["--logit_std", 0], "logit_std must be > 0, got 0.0"),
             (tiny_sd3_pipeline, ["--max_sequence_length", 0], "max_sequence_length must be >= 1, got 0")]
    for pipe_dir, extra, message in cases:
        out = tmp_path / "out"
        assert train(pipe_dir, captioned_digits_dir, out, *extra) == 2, message
        assert message in capsys.readouterr().err
        assert not (out / "model_index.json").exists()


def detection_task(pipe_dir: str, tmp_path):
    return load_eval_task(EvalConfig(pretrained_model_name_or_path=pipe_dir, output_dir=str(tmp_path),
                                     detect_prompts=True, prompts_file="unused", resolution=16))


def test_prompt_detection_steps_through_the_pipelines_own_schedule(family, tmp_path):
    """The timesteps prompt_scores steps through are those the pipeline renders with: Flux's dynamically shifted
    schedule from the image's token count, SD3's shifted one."""
    name, pipe_dir = family
    task = detection_task(pipe_dir, tmp_path)
    seen = []
    pipe = FAMILIES[name][0].from_pretrained(pipe_dir)
    pipe(PROMPT, num_inference_steps=5, height=16, width=16, max_sequence_length=task.max_sequence_length,
         output_type="latent",
         callback_on_step_end=lambda p, i, t, kwargs: seen.append(float(t)) or kwargs)
    scheduler = task.sampling_scheduler()
    task.set_sampling_timesteps(scheduler, 5)
    assert [float(t) for t in scheduler.timesteps] == pytest.approx(seen)
    scores = prompt_scores(task, [PROMPT, ""], 5, 2, 2, 0, 4, torch.device("cpu"), False)
    # The empty prompt is the unconditional prediction itself.
    assert float(scores[1]) < 1e-5 < float(scores[0])


def test_sd3_prompt_score_is_the_written_out_velocity_gap(tiny_sd3_pipeline, tmp_path):
    """--detect_prompts on SD3 (Wen et al.'s score of a flow-matching model): the conditional minus unconditional
    velocity, averaged over the first two steps of the flow-matching Euler sampler at the pipeline's default
    guidance (7.0), written out with the pipeline's own prompt encoding."""
    task = detection_task(tiny_sd3_pipeline, tmp_path)
    scores = prompt_scores(task, [PROMPT], num_inference_steps=10, detect_steps=2, num_seeds=1, seed=3,
                           batch_size=2, device=torch.device("cpu"), show_progress=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)

    def velocity(x, t, prompt):
        hidden, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=task.max_sequence_length)
        return pipe.transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=hidden,
                                pooled_projections=pooled).sample

    side = task.resolution // task.vae_scale_factor
    (generator,) = sample_generators(3, range(1))
    x, gaps = torch.randn((1, 4, side, side), generator=generator), []
    with torch.no_grad():
        for k in range(2):
            t = scheduler.timesteps[k]
            cond, uncond = velocity(x, t, PROMPT), velocity(x, t, "")
            gaps.append(float((cond - uncond).norm()))
            x = x + (scheduler.sigmas[k + 1] - scheduler.sigmas[k]) * (uncond + 7.0 * (cond - uncond))
    assert float(scores[0]) == pytest.approx(sum(gaps) / 2, rel=1e-4)


def test_flux_prompt_score_is_the_written_out_velocity_gap(tiny_flux_pipeline, tmp_path):
    """--detect_prompts on Flux: the first step's conditional minus unconditional velocity, on 2 x 2 packed latents
    at the guidance the transformer embeds (3.5), written out with the pipeline's own encoding and packing."""
    task = detection_task(tiny_flux_pipeline, tmp_path)
    scores = prompt_scores(task, [PROMPT], num_inference_steps=10, detect_steps=1, num_seeds=1, seed=3,
                           batch_size=2, device=torch.device("cpu"), show_progress=False)
    pipe = FluxPipeline.from_pretrained(tiny_flux_pipeline)
    scheduler = task.sampling_scheduler()
    task.set_sampling_timesteps(scheduler, 10)
    t = scheduler.timesteps[0]
    side = task.resolution // task.vae_scale_factor
    (generator,) = sample_generators(3, range(1))
    x = torch.randn((1, 4, side, side), generator=generator)
    packed = FluxPipeline._pack_latents(x, 1, 4, side, side)
    ids = FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, x.device, x.dtype)

    def velocity(prompt):
        hidden, pooled, text_ids = pipe.encode_prompt(prompt, max_sequence_length=task.max_sequence_length)
        return pipe.transformer(hidden_states=packed, timestep=t.expand(1) / 1000, guidance=torch.tensor([3.5]),
                                pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=text_ids,
                                img_ids=ids).sample

    with torch.no_grad():
        gap = velocity(PROMPT) - velocity("")
    assert float(scores[0]) == pytest.approx(float(gap.norm()), rel=1e-4)
