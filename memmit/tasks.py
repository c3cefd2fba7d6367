"""Pipeline kinds: what to load, how to compute per-sample losses, how to rebuild the pipeline.

A task owns the denoiser it trains, the frozen parts and the forward process (noise.py); the trainer trains the
denoiser. Add a pipeline kind by writing one more DenoisingTask subclass and naming it in families.py (the
flow-matching transformer families are in flow.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMPipeline, DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from .captions import ANCHORS, CaptionNoise, caption_vocabulary
from .data import ImageTransform, pick_caption
from .draws import per_sample_randn
from .noise import DDPMNoise

DENOISER_COMPONENTS = ("unet", "transformer")  # diffusers' names for the model a pipeline denoises with
NUM_DEFAULT_PROMPTS = 4  # training captions rendered at each round's end when no validation_prompts are given
PROMPT_BATCH = 32  # prompts per text-encoder pass outside a training step (the latent cache, anchor choice)
TOKEN_SUFFIXES = ("", "_2", "_3")  # batch keys of each tokenizer's tokens: input_ids, input_ids_2, input_ids_3


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


def replace_vae(pipeline: DiffusionPipeline, name_or_path: str) -> None:
    """--pretrained_vae_model_name_or_path: that AutoencoderKL in place of the pipeline's VAE, registered so that
    the saved pipeline holds it (a LoRA export leaves the VAE to whoever loads it)."""
    if getattr(pipeline, "vae", None) is None:
        raise ValueError(f"pretrained_vae_model_name_or_path: pipeline {type(pipeline).__name__} has no vae to replace")
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"pretrained_vae_model_name_or_path {name_or_path!r}: cannot load an AutoencoderKL "
                         f"({str(exc).splitlines()[0]})") from exc
    if vae.config.latent_channels != pipeline.vae.config.latent_channels:
        raise ValueError(f"pretrained_vae_model_name_or_path {name_or_path!r} has {vae.config.latent_channels} latent "
                         f"channels, the pipeline's vae {pipeline.vae.config.latent_channels}")
    pipeline.register_modules(vae=vae)


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
    tokenizers: tuple = ()
    max_lengths: tuple[int, ...] = ()  # tokens per prompt of each tokenizer

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.image_column, self.caption_column)

    def __call__(self, rows: dict, generators: Sequence[torch.Generator], ids: Sequence[int] = ()) -> dict:
        inputs = super().__call__(rows, generators)
        return dict(inputs, **self.text_inputs(rows, generators)[1])

    def text_inputs(self, rows: dict, generators: Sequence[torch.Generator]) -> tuple[list[str], dict]:
        """Each row's prompt, and its tokens (`input_ids`). A row with anchor captions (dedup_captions=anchor,
        split.py) trains its own caption as is and draws one of its anchors: then `anchor_ids` holds the anchors'
        tokens (the empty prompt's for other rows) and `anchored` marks those rows. A second and third tokenizer's
        tokens (SDXL, SD3, Flux) are `input_ids_2`, `anchor_ids_2`, and so on."""
        anchors = rows.get(ANCHORS) or [[]] * len(generators)
        prompts, drawn = [], []
        for value, choices, g in zip(rows[self.caption_column], anchors, generators):
            prompts.append(pick_caption(value, "first", self.caption_column) if choices else self.prompt(value, g))
            drawn.append(choices[int(torch.randint(len(choices), (), generator=g))] if choices else None)
        text = tokenize(self.tokenizers, self.max_lengths, prompts)
        if any(a is not None for a in drawn):
            text.update(tokenize(self.tokenizers, self.max_lengths, [a or "" for a in drawn], "anchor_ids"),
                        anchored=torch.tensor([a is not None for a in drawn]))
        return prompts, text

    def prompt(self, value, generator: torch.Generator) -> str:
        # Draw the dropout coin only when dropout is on, so caption_dropout=0 leaves the random stream as is.
        if self.caption_dropout and float(torch.rand((), generator=generator)) < self.caption_dropout:
            return ""
        caption = pick_caption(value, generator, self.caption_column)
        return self.caption_noise(caption, generator) if self.caption_noise.active else caption


@dataclass
class MicroConditionedInputs(CaptionedImageInputs):
    """CaptionedImageInputs and SDXL's micro-conditioning of each image, `time_ids`: its original height and
    width, the crop's top and left, the target height and width (the order of diffusers' add_time_ids)."""

    def __call__(self, rows: dict, generators: Sequence[torch.Generator], ids: Sequence[int] = ()) -> dict:
        pixels, crops = [], []
        for img, g in zip(rows[self.image_column], generators):
            x, crop = self.transform.with_crop(img, g)
            pixels.append(x)
            crops.append(crop)
        return {"pixels": torch.stack(pixels), "time_ids": self.time_ids(crops), **self.text_inputs(rows, generators)[1]}

    def time_ids(self, crops: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
        """[N, 6] fp32: each image's ImageTransform.with_crop geometry, then the target height and width."""
        r = self.transform.resolution
        return torch.tensor([[*crop, r, r] for crop in crops], dtype=torch.float32)


def tokenize(tokenizers: Sequence, max_lengths: Sequence[int], prompts: list[str],
             key: str = "input_ids") -> dict[str, torch.Tensor]:
    """Each tokenizer's tokens of the prompts, padded to its max length, under `key`, then `key` + "_2", ..."""
    return {key + suffix: tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                                    return_tensors="pt").input_ids
            for suffix, tokenizer, length in zip(TOKEN_SUFFIXES, tokenizers, max_lengths)}


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
    component: the rest of memmit names no component), its forward process, the per-sample loss, pixels,
    saving."""

    default_agc_lambda: float
    default_agc_bank_bins: Optional[int] = None  # one loss-bank entry per timestep (the paper)
    sampler = "DDIM"  # what renders samples (memmit eval's report names it)
    extra_columns: tuple[str, ...] = ()  # dataset columns needed besides the image column
    caption_column: Optional[str] = None  # the column every sample needs a caption in (text-to-image)

    def __init__(self, pipeline: DiffusionPipeline, resolution: int, channels: int, center_crop: bool,
                 random_flip: bool, image_column: str, noise=None):
        self.pipeline = pipeline
        self.image_column = image_column
        self.denoiser_name = denoiser_component(pipeline)
        self.denoiser = getattr(pipeline, self.denoiser_name)
        # The forward process and its timesteps (noise.py): DDPM's unless a family trains otherwise.
        self.noise = noise or DDPMNoise(pipeline.scheduler.config)
        self.scheduler, self.num_train_timesteps = self.noise.scheduler, self.noise.num_train_timesteps
        self.resolution, self.channels = resolution, channels
        self.transform = ImageTransform(resolution, channels, center_crop, random_flip)
        # Dataset rows -> model inputs, in the trainer or a data-loading worker.
        self.inputs = ImageInputs(image_column, self.transform)

    def denoising_loss(self, denoiser: torch.nn.Module, x0: torch.Tensor, generators: Sequence[torch.Generator],
                       device: torch.device, anchor: Optional[tuple[torch.Tensor, dict]] = None,
                       **conditioning) -> LossOutput:
        """Unreduced fp32 loss per sample of denoising x0, its timestep index, and the noise's loss weights.

        Sample i's noise, then its timestep, come from generators[i] on the CPU (noise.py). `anchor` = (mask,
        conditioning): the masked samples' target is the model's own prediction, gradient stopped, under that
        conditioning instead (Kumari et al. 2023's model-based concept ablation), in the space of the target.
        """
        draw = self.noise(x0, generators, device)
        pred = self.predict(denoiser, draw.noisy, draw.timesteps, conditioning)
        if anchor is None:
            return LossOutput(self.squared_error(pred, draw.target), draw.indices, draw.weights)
        mask, anchor_conditioning = anchor
        with torch.no_grad():
            draw.target[mask] = self.predict(denoiser, draw.noisy[mask], draw.timesteps[mask],
                                             anchor_conditioning).to(draw.target.dtype)
        return LossOutput(self.squared_error(pred, draw.target), draw.indices, draw.weights, anchored=mask.cpu())

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict) -> torch.Tensor:
        """The denoiser's output for noisy inputs at their timesteps (a family that packs its inputs overrides it)."""
        return denoiser(noisy, timesteps, **conditioning).sample

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
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(self.pipeline.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=num_images, generator=generator, num_inference_steps=num_inference_steps,
                   output_type="np").images
        return _images_nchw(out)


class TextToImageTask(DenoisingTask):
    """Stable Diffusion 1.x/2.x: a UNet2DConditionModel denoising VAE latents, conditioned on CLIP text.

    The VAE and the text encoders stay frozen; they run in the mixed-precision dtype as working copies,
    so the pipeline keeps its original weights and `save_pipeline` writes them unchanged. A family with more
    text conditioning (SDXL) names its parts and overrides how tokens become the denoiser's inputs.
    """

    default_agc_lambda = 0.8  # the paper's mem_ratio 1.25 for Stable Diffusion
    family = "Stable Diffusion 1.x/2.x"
    text_parts: tuple[str, ...] = ("text_encoder",)  # the pipeline's text encoders, in the order of...
    tokenizer_parts: tuple[str, ...] = ("tokenizer",)  # ...their tokenizers (batch keys input_ids, input_ids_2, ...)
    optional_parts: tuple[str, ...] = ()  # parts the pipeline may lack (last ones only)
    pipeline_class: type = StableDiffusionPipeline  # what the round-end samples render with
    inputs_class: type = CaptionedImageInputs

    def __init__(self, pipeline: DiffusionPipeline, resolution: Optional[int] = None,
                 center_crop: bool = False, random_flip: bool = False, image_column: str = "image",
                 caption_column: Optional[str] = None, caption_dropout: float = 0.0,
                 snr_gamma: Optional[float] = None, validation_prompts: Optional[list[str]] = None,
                 caption_replace_prob: float = 0.0, caption_insert_prob: float = 0.0, caption_repeat_prob: float = 0.0,
                 text_embedding_noise: float = 0.0, dedup_anchor_weight: float = 1.0, noise=None):
        self.check_parts(pipeline)
        vae = pipeline.vae
        self.vae_scale_factor = vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = resolution or self.default_side(pipeline) * vae_scale_factor
        check_resolution(resolution, *self.resolution_multiple(pipeline, vae_scale_factor))
        super().__init__(pipeline, resolution, int(vae.config.in_channels), center_crop, random_flip, image_column,
                         noise)
        # The parts this pipeline has, in order: an optional one may be missing (SD3 without T5).
        self.text_names = tuple(name for name in self.text_parts if getattr(pipeline, name, None) is not None)
        self.tokenizer_names = tuple(name for name in self.tokenizer_parts if getattr(pipeline, name, None) is not None)
        self.caption_column = caption_column
        self.extra_columns = (caption_column,) if caption_column else ()
        self.snr_gamma = snr_gamma
        self.tokenizers = tuple(getattr(pipeline, name) for name in self.tokenizer_names)
        self.inputs = self.inputs_class(
            image_column, self.transform, caption_column, caption_dropout,
            CaptionNoise(caption_replace_prob, caption_insert_prob, caption_repeat_prob), self.tokenizers,
            self.token_lengths())
        self.text_embedding_noise = text_embedding_noise
        self.anchor_weight = dedup_anchor_weight
        self.validation_prompts = validation_prompts
        self.default_prompts: list[str] = []
        self.vae = vae
        self.text_encoders = [getattr(pipeline, name) for name in self.text_names]
        self.weight_dtype = torch.float32

    @classmethod
    def check_parts(cls, pipeline: DiffusionPipeline) -> None:
        """Refuse, naming the part, a pipeline this task would train wrongly (a part missing, other conditioning,
        inpainting)."""
        required = [part for part in ("vae", *cls.text_parts, *cls.tokenizer_parts) if part not in cls.optional_parts]
        missing = [part for part in required if getattr(pipeline, part, None) is None]
        if missing:
            raise ValueError(f"pipeline {type(pipeline).__name__} has no {', '.join(missing)}; memmit trains "
                             f"{cls.family} pipelines with {', '.join(required)}")
        cls.check_conditioning(pipeline)

    @classmethod
    def check_conditioning(cls, pipeline: DiffusionPipeline) -> None:
        """Refuse a denoiser whose inputs do not fit the text encoders' and the VAE's outputs, naming them."""
        if pipeline.unet.config.addition_embed_type is not None or getattr(pipeline, "text_encoder_2", None) is not None:
            raise ValueError(f"pipeline {type(pipeline).__name__} conditions its UNet on more than one text encoder's "
                             "output (e.g. SDXL, which memmit trains as a StableDiffusionXLPipeline)")
        _check_latent_channels(pipeline)

    @classmethod
    def default_side(cls, pipeline: DiffusionPipeline) -> int:
        """The denoiser's default latent side (resolution / the VAE's downsampling)."""
        return _side(getattr(pipeline, denoiser_component(pipeline)).config.sample_size)

    @classmethod
    def resolution_multiple(cls, pipeline: DiffusionPipeline, vae_scale_factor: int) -> tuple[int, str]:
        """What every resolution must be a multiple of, and why."""
        # The UNet2DConditionModel takes latents of any size; the VAE and the pipelines do not.
        return math.lcm(vae_scale_factor, 8), (f"its VAE downsamples the image by {vae_scale_factor} and "
                                               f"{type(pipeline).__name__} renders only multiples of 8")

    def token_lengths(self) -> tuple[int, ...]:
        """Tokens per prompt of each tokenizer."""
        return tuple(tokenizer.model_max_length for tokenizer in self.tokenizers)

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype the frozen VAE runs in."""
        return weight_dtype

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Frozen working copies of the VAE and text encoders on the device, in the mixed-precision dtype."""
        self.vae = _frozen_copy(self.pipeline.vae, device, self.vae_dtype(weight_dtype))
        self.text_encoders = [_frozen_copy(getattr(self.pipeline, name), device, weight_dtype)
                              for name in self.text_names]
        self.weight_dtype = weight_dtype

    def encode_tokens(self, tokens: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The text conditioning of tokenized prompts (one tensor per tokenizer): the text encoder's last hidden
        states, and the pooled embedding a family also conditions on (none here)."""
        return self.text_encoders[0](tokens[0])[0], None

    def encode_text(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        tokens = tokenize(self.tokenizers, self.token_lengths(), prompts)
        return self.encode_tokens([ids.to(device) for ids in tokens.values()])

    def denoiser_kwargs(self, hidden: torch.Tensor, pooled: Optional[torch.Tensor],
                        time_ids: Optional[torch.Tensor] = None) -> dict:
        """The denoiser's conditioning arguments."""
        return {"encoder_hidden_states": hidden}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device, progress: Optional[str] = None
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """encode_text of every prompt on the CPU, [N, tokens, width] (and [N, width] pooled, or None): batched,
        under autocast in weight_dtype as in a training step, so the values are the ones a step computes;
        `progress`: a bar's label."""
        autocast = torch.autocast(device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32)
        hidden, pooled = [], []
        for i in tqdm(range(0, len(prompts), PROMPT_BATCH), desc=progress, disable=progress is None, leave=False):
            with autocast:
                h, p = self.encode_text(prompts[i:i + PROMPT_BATCH], device)
            hidden.append(h.cpu())
            pooled.append(p if p is None else p.cpu())
        return torch.cat(hidden), None if pooled[0] is None else torch.cat(pooled)

    def caption_embeddings(self, captions: list[str]) -> torch.Tensor:
        """Each caption's text-encoder output, the denoiser's conditioning, flattened: [N, tokens x width] fp32 on
        the CPU (dedup_captions=anchor compares captions by it)."""
        device = next(self.text_encoders[0].parameters()).device
        return self.encode_prompts(captions, device)[0].float().flatten(1)

    def use_training_captions(self, captions: Sequence) -> None:
        """The caption column's values: the round-end samples render the first few non-empty ones when no
        validation_prompts are given (a list contributes its first), and random caption replacement and word
        insertion draw from their words."""
        prompts = [pick_caption(value, "first", self.caption_column) for value in captions[:4 * NUM_DEFAULT_PROMPTS]]
        self.default_prompts = [p for p in prompts if p][:NUM_DEFAULT_PROMPTS]
        noise = self.inputs.caption_noise
        if noise.replace_prob or noise.insert_prob:
            noise.vocabulary = caption_vocabulary(captions, self.caption_column)

    def per_sample_loss(self, denoiser: torch.nn.Module, batch: dict, generators: Sequence[torch.Generator],
                        device: torch.device) -> LossOutput:
        """Unreduced fp32 loss per sample on VAE latents, its timestep index, and its weights: min-SNR (if
        snr_gamma is set) or the flow-matching scheme's, times dedup_anchor_weight for anchored samples.

        Sample i's latent is drawn from generators[i] before its noise and timestep, and so is its text-embedding
        noise (text_embedding_noise > 0), between them.
        """
        with torch.no_grad():
            if "latent_mean" in batch:  # --cache_latents (latents.py)
                mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
            else:
                posterior = self.encode_pixels(batch["pixels"], device)
                mean, std = posterior.mean, posterior.std
            # DiagonalGaussianDistribution.sample's formula, with one generator per sample.
            eps = per_sample_randn(mean.shape[1:], generators).to(device, mean.dtype)
            latents = (mean + std * eps).float()
            if shift := self.vae.config.get("shift_factor"):  # SD3's and Flux's VAEs centre latents before scaling
                latents = latents - shift
            latents = latents * self.vae.config.scaling_factor
            text, pooled = self._text_embeddings(batch, device)
            if self.text_embedding_noise:  # Somepalli et al.'s GNI: the same caption never conditions alike twice
                text = text + self.text_embedding_noise * per_sample_randn(text.shape[1:], generators).to(device)
            time_ids = batch.get("time_ids")
            anchor = None
            if "anchored" in batch:
                mask = batch["anchored"].to(device)
                anchor_text, anchor_pooled = self._encoded(batch, "anchor_ids", device, mask)
                anchor = (mask, self.denoiser_kwargs(anchor_text, anchor_pooled,
                                                     None if time_ids is None else time_ids[mask.cpu()]))
        out = self.denoising_loss(denoiser, latents, generators, device, anchor,
                                  **self.denoiser_kwargs(text, pooled, time_ids))
        if self.snr_gamma is not None:
            out.weights = min_snr_weights(self.scheduler, out.timesteps.to(device), self.snr_gamma,
                                          self.noise.prediction_type)
        if anchor is not None and self.anchor_weight != 1:
            # A copied caption keeps one anchored sample per epoch, where its copies had dozens: its loss weight
            # sets how fast that caption unlearns the image (EFFICACY.md measured 1, 4 and 8).
            weights = torch.ones_like(out.losses) if out.weights is None else out.weights
            out.weights = torch.where(anchor[0], self.anchor_weight * weights, weights)
        return out

    def encode_pixels(self, pixels: torch.Tensor, device: torch.device):
        """The VAE's latent distribution of pixels; a VAE kept in fp32 under fp16 (vae_dtype) runs outside
        autocast, which would run its convolutions in fp16 again."""
        upcast = self.vae.dtype != self.weight_dtype
        with torch.autocast(device.type, enabled=False) if upcast else contextlib.nullcontext():
            return self.vae.encode(pixels.to(device, self.vae.dtype)).latent_dist

    def _encoded(self, batch: dict, key: str, device: torch.device, mask: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """encode_tokens of the batch's tokens under `key` (of the rows `mask` marks), in fp32."""
        tokens = [batch[key + suffix].to(device) for suffix in TOKEN_SUFFIXES[:len(self.tokenizers)]]
        return fp32(*self.encode_tokens([ids if mask is None else ids[mask] for ids in tokens]))

    def _text_embeddings(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The conditioning of the batch's prompts, fp32; with --cache_latents read from the cache, except for
        prompts the caption rules made up."""
        if "text" not in batch:
            return self._encoded(batch, "input_ids", device)
        text, missing = batch["text"].to(device).float(), batch["encode"].to(device)
        pooled = batch["pooled"].to(device).float() if "pooled" in batch else None
        if missing.any():
            hidden, extra = self._encoded(batch, "input_ids", device, missing)
            text[missing] = hidden
            if pooled is not None:
                pooled[missing] = extra
        return text, pooled

    def pipeline_options(self) -> dict:
        """pipeline_class's arguments besides its models, for the round-end samples."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def sampling_scheduler(self):
        """What renders samples: DDIM from the pipeline's scheduler config."""
        return DDIMScheduler.from_config(self.pipeline.scheduler.config)

    def render_options(self) -> dict:
        """pipeline_class's call arguments besides the prompts, size, steps and generator."""
        return {}

    @torch.no_grad()
    def sample(self, denoiser: torch.nn.Module, num_images: int, num_inference_steps: int,
               generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Images in [0, 1], NCHW on the CPU, from pipeline_class with sampling_scheduler (DDIM from the pipeline's
        scheduler config; flow matching: its own sampler), cycling over validation_prompts (else the default
        prompts, else the empty prompt)."""
        parts = {**dict.fromkeys(self.optional_parts), **dict(zip(self.text_names, self.text_encoders)),
                 **dict(zip(self.tokenizer_names, self.tokenizers)), self.denoiser_name: denoiser}
        pipe = self.pipeline_class(vae=self.vae, scheduler=self.sampling_scheduler(), **parts, **self.pipeline_options())
        pipe.set_progress_bar_config(disable=True)
        prompts = self.validation_prompts or self.default_prompts or [""]
        prompts = [prompts[i % len(prompts)] for i in range(num_images)]
        # The frozen parts run in weight_dtype and the denoiser in fp32, as in training.
        with torch.autocast(denoiser.device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32):
            out = pipe(prompts, height=self.resolution, width=self.resolution, num_inference_steps=num_inference_steps,
                       generator=generator, output_type="np", **self.render_options()).images
        return _images_nchw(out)


class StableDiffusionXLTask(TextToImageTask):
    """SDXL (StableDiffusionXLPipeline): the UNet is conditioned on both CLIP text encoders' penultimate hidden
    states side by side, on the second one's pooled projection, and on each image's original size and crop
    (`time_ids`, recorded by the transform), as diffusers' SDXL training example conditions it."""

    family = "SDXL"
    text_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    pipeline_class = StableDiffusionXLPipeline
    inputs_class = MicroConditionedInputs

    @classmethod
    def check_conditioning(cls, pipeline: DiffusionPipeline) -> None:
        unet, first, second = pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(f"pipeline {type(pipeline).__name__}'s unet has addition_embed_type "
                             f"{unet.config.addition_embed_type!r}, not SDXL's 'text_time'")
        width = first.config.hidden_size + second.config.hidden_size
        if unet.config.cross_attention_dim != width:
            raise ValueError(f"pipeline {type(pipeline).__name__}'s unet cross_attention_dim "
                             f"{unet.config.cross_attention_dim} is not text_encoder's hidden_size "
                             f"{first.config.hidden_size} + text_encoder_2's {second.config.hidden_size}")
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        if getattr(second.config, "projection_dim", None) != pooled or not hasattr(second, "text_projection"):
            raise ValueError(f"pipeline {type(pipeline).__name__}'s unet takes a {pooled}-wide pooled text embedding; "
                             f"text_encoder_2 ({type(second).__name__}) must project to it (CLIPTextModelWithProjection)")
        _check_latent_channels(pipeline)

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        # SDXL's own VAE overflows in fp16, which its config says (force_upcast); an fp16-safe replacement
        # (--pretrained_vae_model_name_or_path) says it is not.
        return torch.float32 if weight_dtype == torch.float16 and self.pipeline.vae.config.force_upcast else weight_dtype

    def encode_tokens(self, tokens: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """diffusers' SDXL encode_prompt: both encoders' penultimate hidden states concatenated, and the second
        encoder's projected pooled output (CLIPTextModelWithProjection's text_embeds)."""
        hidden = []
        for encoder, ids in zip(self.text_encoders, tokens):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), out[0]

    def denoiser_kwargs(self, hidden: torch.Tensor, pooled: Optional[torch.Tensor],
                        time_ids: Optional[torch.Tensor] = None) -> dict:
        """Without time_ids, what the pipeline passes when sampling: an image of the target size, not cropped."""
        if time_ids is None:
            r = self.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32).expand(len(hidden), 6)
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(hidden.device)}}

    def pipeline_options(self) -> dict:
        return {"force_zeros_for_empty_prompt": self.pipeline.config.force_zeros_for_empty_prompt,
                "add_watermarker": False}


def fp32(hidden: torch.Tensor, pooled: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Text conditioning in fp32 (pooled may be None): it keeps the fp32 denoiser working where autocast is off."""
    return hidden.float(), None if pooled is None else pooled.float()


def _check_latent_channels(pipeline: DiffusionPipeline) -> None:
    unet, vae = pipeline.unet, pipeline.vae
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"pipeline {type(pipeline).__name__}'s UNet takes {unet.config.in_channels} input channels, "
                         f"not the VAE's {vae.config.latent_channels} latent channels (e.g. inpainting); not supported")


def _frozen_copy(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(module).requires_grad_(False).eval().to(device, dtype)
