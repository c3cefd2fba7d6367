"""Pipeline kinds: what to load, how to compute per-sample losses, how to rebuild the pipeline.

A task owns the frozen parts and the noise scheduler; the trainer owns the trainable UNet. Add a
pipeline kind by writing one more DenoisingTask subclass and naming it in `load_task`.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel,
                       UNet2DModel)
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from .captions import ANCHORS, CAPTION_OPTIONS, CaptionNoise, caption_vocabulary
from .data import ImageTransform, pick_caption
from .draws import per_sample_randint, per_sample_randn

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DENOISER_COMPONENTS = ("unet", "transformer")  # diffusers' names for the model a pipeline denoises with
NUM_DEFAULT_PROMPTS = 4  # training captions rendered at each round's end when no validation_prompts are given
PROMPT_BATCH = 32  # prompts per text-encoder pass outside a training step (the latent cache, anchor choice)


def load_pipeline(name_or_path: str, revision: Optional[str] = None, variant: Optional[str] = None) -> DiffusionPipeline:
    """A pipeline from a local dir or the Hub, with a clear error for a missing path."""
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".") or name_or_path.count("/") > 1
    if looks_local and not os.path.isdir(name_or_path):
        raise ValueError(f"pretrained_model_name_or_path {name_or_path!r} does not exist")
    if os.path.isdir(name_or_path) and not (Path(name_or_path) / "model_index.json").is_file():
        raise ValueError(f"{name_or_path!r} is not a diffusers pipeline (no model_index.json)")
    try:
        index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load pipeline {name_or_path!r}: {exc}") from exc
    if not any(name in index for name in DENOISER_COMPONENTS):
        raise ValueError(f"pipeline {index.get('_class_name')} at {name_or_path!r} has neither a unet nor a "
                         "transformer component: memmit trains a diffusion pipeline's denoiser")
    return DiffusionPipeline.from_pretrained(name_or_path, revision=revision, variant=variant)


@dataclass
class ImageInputs:
    """Dataset rows -> the denoiser's inputs: each image transformed with random crop and flip drawn from its
    sample's own generator. Holds no model, so a data-loading worker receives it cheaply."""

    image_column: str
    transform: ImageTransform

    @property
    def columns(self) -> tuple[str, ...]:
        """The dataset columns it reads."""
        return (self.image_column,)

    def __call__(self, rows: dict, generators: Sequence[torch.Generator], ids: Sequence[int] = ()) -> dict:
        """`ids`: the rows' sample ids, which inputs read from the rows themselves do not need."""
        return {"pixels": torch.stack([self.transform(img, g) for img, g in zip(rows[self.image_column], generators)])}


@dataclass
class CaptionedImageInputs(ImageInputs):
    """ImageInputs and, per image, a tokenized prompt: empty with probability caption_dropout, else its caption
    (one of a list at random) through the caption rules that are on; drawn after the image's crop and flip."""

    caption_column: str = "text"
    caption_dropout: float = 0.0
    caption_noise: CaptionNoise = field(default_factory=CaptionNoise)
    tokenizer: Any = None

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.image_column, self.caption_column)

    def __call__(self, rows: dict, generators: Sequence[torch.Generator], ids: Sequence[int] = ()) -> dict:
        inputs = super().__call__(rows, generators)
        return dict(inputs, **self.text_inputs(rows, generators)[1])

    def text_inputs(self, rows: dict, generators: Sequence[torch.Generator]) -> tuple[list[str], dict]:
        """Each row's prompt, and its tokens (`input_ids`). A row with anchor captions (dedup_captions=anchor,
        split.py) trains its own caption as is and draws one of its anchors: then `anchor_ids` holds the anchors'
        tokens (the empty prompt's for other rows) and `anchored` marks those rows."""
        anchors = rows.get(ANCHORS) or [[]] * len(generators)
        prompts, drawn = [], []
        for value, choices, g in zip(rows[self.caption_column], anchors, generators):
            prompts.append(pick_caption(value, "first", self.caption_column) if choices else self.prompt(value, g))
            drawn.append(choices[int(torch.randint(len(choices), (), generator=g))] if choices else None)
        text = {"input_ids": tokenize(self.tokenizer, prompts)}
        if any(a is not None for a in drawn):
            text.update(anchor_ids=tokenize(self.tokenizer, [a or "" for a in drawn]),
                        anchored=torch.tensor([a is not None for a in drawn]))
        return prompts, text

    def prompt(self, value, generator: torch.Generator) -> str:
        # Draw the dropout coin only when dropout is on, so caption_dropout=0 leaves the random stream as is.
        if self.caption_dropout and float(torch.rand((), generator=generator)) < self.caption_dropout:
            return ""
        caption = pick_caption(value, generator, self.caption_column)
        return self.caption_noise(caption, generator) if self.caption_noise.active else caption


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@dataclass
class LossOutput:
    """Per-sample fp32 losses (what AGC reads), their timesteps (CPU), optional loss weights (e.g. min-SNR), and
    which samples were anchored (CPU bool; dedup_captions=anchor): AGC neither reads nor masks those."""

    losses: torch.Tensor
    timesteps: torch.Tensor
    weights: Optional[torch.Tensor] = None
    anchored: Optional[torch.Tensor] = None


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), expressed for the scheduler's prediction target."""
    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def _images_nchw(images: np.ndarray) -> torch.Tensor:
    """A pipeline's output_type="np" images (NHWC) as the NCHW tensor the trainer logs."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _side(sample_size) -> int:
    """A config's sample_size, given as an int or as (height, width)."""
    return sample_size if isinstance(sample_size, int) else sample_size[0]


def check_resolution(resolution: int, factor: int, reason: str) -> None:
    """Refuse a resolution that is not a multiple of `factor`, suggesting the nearest ones that are."""
    if resolution % factor:
        below = resolution // factor * factor
        nearest = " or ".join(str(r) for r in (below, below + factor) if r > 0)
        raise ValueError(f"resolution {resolution} must be a multiple of {factor} for this pipeline ({reason}); "
                         f"pass --resolution {nearest}")


def denoiser_component(pipeline: DiffusionPipeline) -> str:
    """The name of the model a pipeline denoises with: `unet` (DDPM, Stable Diffusion 1/2, SDXL) or
    `transformer` (SD3, Flux, PixArt)."""
    found = [name for name in DENOISER_COMPONENTS if getattr(pipeline, name, None) is not None]
    if not found:
        raise ValueError(f"pipeline {type(pipeline).__name__} has neither a unet nor a transformer component: "
                         "memmit trains a diffusion pipeline's denoiser")
    return found[0]


class DenoisingTask:
    """What every pipeline kind shares: the denoiser it trains (`denoiser`, the pipeline's `denoiser_name`
    component: the rest of memmit names no component), the scheduler's target, the per-sample loss, pixels,
    saving."""

    default_agc_lambda: float
    extra_columns: tuple[str, ...] = ()  # dataset columns needed besides the image column
    caption_column: Optional[str] = None  # the column every sample needs a caption in (text-to-image)

    def __init__(self, pipeline: DiffusionPipeline, resolution: int, channels: int, center_crop: bool,
                 random_flip: bool, image_column: str):
        self.pipeline = pipeline
        self.image_column = image_column
        self.denoiser_name = denoiser_component(pipeline)
        self.denoiser = getattr(pipeline, self.denoiser_name)
        self.scheduler = pipeline.scheduler
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.resolution, self.channels = resolution, channels
        self.transform = ImageTransform(resolution, channels, center_crop, random_flip)
        # Dataset rows -> model inputs, in the trainer or a data-loading worker.
        self.inputs = ImageInputs(image_column, self.transform)

    def denoising_loss(self, unet: torch.nn.Module, x0: torch.Tensor, generators: Sequence[torch.Generator],
                       device: torch.device, anchor: Optional[tuple[torch.Tensor, dict]] = None,
                       **conditioning) -> LossOutput:
        """Unreduced fp32 loss per sample of denoising x0, and its timestep.

        Sample i's noise, then its timestep, come from generators[i] on the CPU (draws.py), so a run is
        reproducible on any device and in any batch, and resumable exactly. `anchor` = (mask, conditioning): the
        masked samples' target is the model's own prediction, gradient stopped, under that conditioning instead
        (Kumari et al. 2023's model-based concept ablation), in the space of prediction_type.
        """
        noise = per_sample_randn(x0.shape[1:], generators)
        timesteps = per_sample_randint(self.num_train_timesteps, generators)
        x0, noise, t = x0.to(device), noise.to(device), timesteps.to(device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, **conditioning).sample
        target = self.target(x0, noise, t)
        if anchor is None:
            return LossOutput(self.squared_error(pred, target), timesteps)
        mask, anchor_conditioning = anchor
        with torch.no_grad():
            target[mask.to(device)] = unet(noisy[mask], t[mask], **anchor_conditioning).sample.to(target.dtype)
        return LossOutput(self.squared_error(pred, target), timesteps, anchored=mask.cpu())

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoising target of prediction_type."""
        if self.prediction_type == "epsilon":
            return noise.clone()
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return x0.clone()

    @staticmethod
    def squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """mean over C,H,W of (prediction - target)^2 in fp32."""
        return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)

    def save_pipeline(self, denoiser: torch.nn.Module, output_dir: str | Path) -> None:
        """The original pipeline class with the trained denoiser, safetensors only."""
        setattr(self.pipeline, self.denoiser_name, denoiser)
        self.pipeline.save_pretrained(output_dir, safe_serialization=True)


class UnconditionalTask(DenoisingTask):
    """DDPMPipeline / DDIMPipeline: a UNet2DModel denoising pixels, no conditioning."""

    default_agc_lambda = 0.5  # the paper's mem_ratio 2.0 for pixel-space models

    def __init__(self, pipeline: DiffusionPipeline, resolution: Optional[int] = None,
                 center_crop: bool = False, random_flip: bool = False, image_column: str = "image"):
        unet = pipeline.unet
        resolution = resolution or _side(unet.config.sample_size)
        halvings = len(unet.config.down_block_types) - 1
        check_resolution(resolution, 2 ** halvings,
                         f"its UNet2DModel's {halvings + 1} down blocks downsample the image by {2 ** halvings}")
        super().__init__(pipeline, resolution, int(unet.config.in_channels), center_crop, random_flip, image_column)

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move frozen parts to the device in the mixed-precision dtype; an unconditional UNet has none."""

    def per_sample_loss(self, unet: torch.nn.Module, batch: dict, generators: Sequence[torch.Generator],
                        device: torch.device) -> LossOutput:
        """Unreduced fp32 loss per sample and its timestep."""
        return self.denoising_loss(unet, batch["pixels"], generators, device)

    @torch.no_grad()
    def sample(self, unet: torch.nn.Module, num_images: int, num_inference_steps: int,
               generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Images in [0, 1], NCHW on the CPU, sampled with DDIM from this task's scheduler config."""
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(self.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=num_images, generator=generator, num_inference_steps=num_inference_steps,
                   output_type="np").images
        return _images_nchw(out)


class TextToImageTask(DenoisingTask):
    """Stable Diffusion 1.x/2.x: a UNet2DConditionModel denoising VAE latents, conditioned on CLIP text.

    The VAE and the text encoder stay frozen; they run in the mixed-precision dtype as working copies,
    so the pipeline keeps its original weights and `save_pipeline` writes them unchanged.
    """

    default_agc_lambda = 0.8  # the paper's mem_ratio 1.25 for Stable Diffusion

    def __init__(self, pipeline: DiffusionPipeline, resolution: Optional[int] = None,
                 center_crop: bool = False, random_flip: bool = False, image_column: str = "image",
                 caption_column: Optional[str] = None, caption_dropout: float = 0.0,
                 snr_gamma: Optional[float] = None, validation_prompts: Optional[list[str]] = None,
                 caption_replace_prob: float = 0.0, caption_insert_prob: float = 0.0, caption_repeat_prob: float = 0.0,
                 text_embedding_noise: float = 0.0, dedup_anchor_weight: float = 1.0):
        _check_text_to_image_parts(pipeline)
        vae = pipeline.vae
        self.vae_scale_factor = vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = resolution or _side(pipeline.unet.config.sample_size) * vae_scale_factor
        # The UNet2DConditionModel takes latents of any size; the VAE and StableDiffusionPipeline do not.
        check_resolution(resolution, math.lcm(vae_scale_factor, 8), f"its VAE downsamples the image by "
                         f"{vae_scale_factor} and StableDiffusionPipeline renders only multiples of 8")
        super().__init__(pipeline, resolution, int(vae.config.in_channels), center_crop, random_flip, image_column)
        self.caption_column = caption_column
        self.extra_columns = (caption_column,) if caption_column else ()
        self.snr_gamma = snr_gamma
        self.tokenizer = pipeline.tokenizer
        self.inputs = CaptionedImageInputs(
            image_column, self.transform, caption_column, caption_dropout,
            CaptionNoise(caption_replace_prob, caption_insert_prob, caption_repeat_prob), self.tokenizer)
        self.text_embedding_noise = text_embedding_noise
        self.anchor_weight = dedup_anchor_weight
        self.validation_prompts = validation_prompts
        self.default_prompts: list[str] = []
        self.vae, self.text_encoder = vae, pipeline.text_encoder
        self.weight_dtype = torch.float32

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Frozen working copies of the VAE and text encoder on the device, in the mixed-precision dtype."""
        self.vae = _frozen_copy(self.pipeline.vae, device, weight_dtype)
        self.text_encoder = _frozen_copy(self.pipeline.text_encoder, device, weight_dtype)
        self.weight_dtype = weight_dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device, progress: Optional[str] = None
                       ) -> torch.Tensor:
        """The text encoder's output for each prompt, [N, tokens, width] on the CPU: batched, under autocast in
        weight_dtype as in a training step, so the values are the ones a step computes; `progress`: a bar's label."""
        autocast = torch.autocast(device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32)
        out = []
        for i in tqdm(range(0, len(prompts), PROMPT_BATCH), desc=progress, disable=progress is None, leave=False):
            with autocast:
                out.append(self.text_encoder(tokenize(self.tokenizer, prompts[i:i + PROMPT_BATCH]).to(device))[0].cpu())
        return torch.cat(out)

    def caption_embeddings(self, captions: list[str]) -> torch.Tensor:
        """Each caption's text-encoder output, the denoiser's conditioning, flattened: [N, tokens x width] fp32 on
        the CPU (dedup_captions=anchor compares captions by it)."""
        return self.encode_prompts(captions, next(self.text_encoder.parameters()).device).float().flatten(1)

    def use_training_captions(self, captions: Sequence) -> None:
        """The caption column's values: the round-end samples render the first few non-empty ones when no
        validation_prompts are given (a list contributes its first), and random caption replacement and word
        insertion draw from their words."""
        prompts = [pick_caption(value, "first", self.caption_column) for value in captions[:4 * NUM_DEFAULT_PROMPTS]]
        self.default_prompts = [p for p in prompts if p][:NUM_DEFAULT_PROMPTS]
        noise = self.inputs.caption_noise
        if noise.replace_prob or noise.insert_prob:
            noise.vocabulary = caption_vocabulary(captions, self.caption_column)

    def per_sample_loss(self, unet: torch.nn.Module, batch: dict, generators: Sequence[torch.Generator],
                        device: torch.device) -> LossOutput:
        """Unreduced fp32 loss per sample on VAE latents, its timestep, and min-SNR weights if snr_gamma is set.

        Sample i's latent is drawn from generators[i] before its noise and timestep, and so is its text-embedding
        noise (text_embedding_noise > 0), between them.
        """
        with torch.no_grad():
            if "latent_mean" in batch:  # --cache_latents (latents.py)
                mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
            else:
                posterior = self.vae.encode(batch["pixels"].to(device, self.weight_dtype)).latent_dist
                mean, std = posterior.mean, posterior.std
            # DiagonalGaussianDistribution.sample's formula, with one generator per sample.
            eps = per_sample_randn(mean.shape[1:], generators).to(device, mean.dtype)
            latents = (mean + std * eps).float() * self.vae.config.scaling_factor
            text = self._text_embeddings(batch, device)
            if self.text_embedding_noise:  # Somepalli et al.'s GNI: the same caption never conditions alike twice
                text = text + self.text_embedding_noise * per_sample_randn(text.shape[1:], generators).to(device)
            anchor = None
            if "anchored" in batch:
                mask = batch["anchored"].to(device)
                anchor = (mask, {"encoder_hidden_states": self.text_encoder(batch["anchor_ids"].to(device)[mask])[0]
                                 .float()})
        out = self.denoising_loss(unet, latents, generators, device, anchor, encoder_hidden_states=text)
        if self.snr_gamma is not None:
            out.weights = min_snr_weights(self.scheduler, out.timesteps.to(device), self.snr_gamma,
                                          self.prediction_type)
        if anchor is not None and self.anchor_weight != 1:
            # A copied caption keeps one anchored sample per epoch, where its copies had dozens: its loss weight
            # sets how fast that caption unlearns the image (EFFICACY.md measured 1, 4 and 8).
            weights = torch.ones_like(out.losses) if out.weights is None else out.weights
            out.weights = torch.where(anchor[0], self.anchor_weight * weights, weights)
        return out

    def _text_embeddings(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The text encoder's output for the batch's prompts, fp32 (it keeps the fp32 UNet working where autocast
        is off); with --cache_latents read from the cache, except for prompts the caption rules made up."""
        if "text" not in batch:
            return self.text_encoder(batch["input_ids"].to(device))[0].float()
        text, missing = batch["text"].to(device).float(), batch["encode"].to(device)
        if missing.any():
            text[missing] = self.text_encoder(batch["input_ids"].to(device)[missing])[0].float()
        return text

    @torch.no_grad()
    def sample(self, unet: torch.nn.Module, num_images: int, num_inference_steps: int,
               generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Images in [0, 1], NCHW on the CPU: DDIM from the training scheduler's config, cycling over
        validation_prompts (else the default prompts, else the empty prompt)."""
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=unet, scheduler=DDIMScheduler.from_config(self.scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        prompts = self.validation_prompts or self.default_prompts or [""]
        prompts = [prompts[i % len(prompts)] for i in range(num_images)]
        # The frozen parts run in weight_dtype and the UNet in fp32, as in training.
        with torch.autocast(unet.device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32):
            out = pipe(prompts, height=self.resolution, width=self.resolution, num_inference_steps=num_inference_steps,
                       generator=generator, output_type="np").images
        return _images_nchw(out)


def _check_text_to_image_parts(pipeline: DiffusionPipeline) -> None:
    """Refuse conditional pipelines this task would train wrongly (no CLIP text, extra conditioning, inpainting)."""
    name = type(pipeline).__name__
    missing = [part for part in ("vae", "text_encoder", "tokenizer") if getattr(pipeline, part, None) is None]
    if missing:
        raise ValueError(f"pipeline {name} has no {', '.join(missing)}; memmit trains text-to-image pipelines "
                         "with a vae, a text_encoder and a tokenizer (Stable Diffusion 1.x/2.x)")
    unet = pipeline.unet
    if unet.config.addition_embed_type is not None or getattr(pipeline, "text_encoder_2", None) is not None:
        raise ValueError(f"pipeline {name} conditions its UNet on more than one text encoder's output "
                         "(e.g. SDXL); memmit supports Stable Diffusion 1.x/2.x")
    if unet.config.in_channels != pipeline.vae.config.latent_channels:
        raise ValueError(f"pipeline {name}'s UNet takes {unet.config.in_channels} input channels, not the VAE's "
                         f"{pipeline.vae.config.latent_channels} latent channels (e.g. inpainting); not supported")


def _frozen_copy(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(module).requires_grad_(False).eval().to(device, dtype)


def _options(cfg, names: tuple[str, ...]) -> dict:
    """The config options a task takes; a partial config (e.g. memmit eval's) leaves the task's defaults."""
    return {name: getattr(cfg, name) for name in names if hasattr(cfg, name)}


def load_task(cfg, captions: bool = True) -> DenoisingTask:
    """The task for the pipeline `cfg.pretrained_model_name_or_path` points to; a text-to-image one needs
    `cfg.caption_column` unless `captions` is False (prompts that come from elsewhere)."""
    pipeline = load_pipeline(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
    image_options = ("resolution", "center_crop", "random_flip", "image_column")
    text_options = ("caption_dropout", "snr_gamma", "validation_prompts", *CAPTION_OPTIONS)
    denoiser = getattr(pipeline, denoiser_component(pipeline))
    if isinstance(denoiser, UNet2DModel):
        if given := [name for name in text_options if getattr(cfg, name, None)]:
            raise ValueError(f"{', '.join(given)}: text-to-image options, and {type(pipeline).__name__} is "
                             "unconditional (it has no text to caption)")
        return UnconditionalTask(pipeline, **_options(cfg, image_options))
    if isinstance(denoiser, UNet2DConditionModel):
        if captions and getattr(cfg, "caption_column", None) is None:
            raise ValueError("caption_column is required for text-to-image pipelines (pass --caption_column with "
                             f"the dataset column of captions to train {type(pipeline).__name__})")
        return TextToImageTask(pipeline, **_options(cfg, image_options + ("caption_column",) + text_options
                                                    + ("dedup_anchor_weight",)))
    raise ValueError(f"pipeline {type(pipeline).__name__} with a {type(denoiser).__name__} is not supported yet "
                     "(supported: UNet2DModel pipelines such as DDPMPipeline and DDIMPipeline, and Stable Diffusion "
                     "1.x/2.x with a UNet2DConditionModel)")
