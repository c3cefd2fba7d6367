"""What every pipeline family shares: loading the pipeline, the denoiser it trains, the per-sample loss of its
forward process (noise.py) and saving the result.

A family is one DenoisingTask subclass in a file of its own (unconditional, stable_diffusion, sdxl, sd3, flux),
named in families/__init__.py, which picks it by pipeline and denoiser class.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from ..data.transform import ImageTransform
from ..offline import offline_note
from .inputs import ImageInputs
from .noise import DDPMNoise

DENOISER_COMPONENTS = ("unet", "transformer")  # diffusers' names for the model a pipeline denoises with


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
        raise ValueError(f"cannot load pipeline {name_or_path!r}: {exc}{offline_note(name_or_path)}") from exc
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
class LossOutput:
    """Per-sample fp32 losses (what AGC reads), their timesteps (CPU), optional loss weights (e.g. min-SNR), and
    which samples were anchored (CPU bool; dedup_captions=anchor): AGC neither reads nor masks those."""

    losses: torch.Tensor
    timesteps: torch.Tensor
    weights: Optional[torch.Tensor] = None
    anchored: Optional[torch.Tensor] = None


@dataclass
class Anchor:
    """dedup_captions=anchor's part of a batch: which samples are anchored (a bool mask on the device), the
    denoiser's conditioning for their anchor captions, and the noisiest fraction of the schedule their timesteps
    are drawn from (1: the whole schedule, as any sample)."""

    mask: torch.Tensor
    conditioning: dict
    noisiest: float = 1.0



def images_nchw(images: np.ndarray) -> torch.Tensor:
    """A pipeline's output_type="np" images (NHWC) as the NCHW tensor the trainer logs."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def side(sample_size) -> int:
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
    # One loss-bank entry per timestep (the paper): 50 bins removed nothing more on the DDPM testbeds (EFFICACY.md).
    default_agc_bank_bins: Optional[int] = None
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
                       device: torch.device, anchor: Optional[Anchor] = None,
                       teacher: Optional[torch.nn.Module] = None, **conditioning) -> LossOutput:
        """Unreduced fp32 loss per sample of denoising x0, its timestep index, and the noise's loss weights.

        Sample i's noise, then its timestep, come from generators[i] on the CPU (noise.py). With a `teacher` (a
        frozen denoiser), the target is its prediction for the same input and conditioning instead of the noise
        drawn: distillation. With an `anchor`, the anchored samples' target is the model's own prediction, gradient
        stopped, under their anchor conditioning instead (Kumari et al. 2023's model-based concept ablation), in the
        space of the target, at timesteps in the noisiest `anchor.noisiest` of the schedule (where a sample's
        layout, and so a copy, is decided).
        """
        squeeze = None if anchor is None or anchor.noisiest == 1 else (anchor.mask, anchor.noisiest)
        draw = self.noise(x0, generators, device, squeeze=squeeze)
        pred = self.predict(denoiser, draw.noisy, draw.timesteps, conditioning)
        if teacher is not None:  # the whole batch: simpler than slicing every family's conditioning by rows
            with torch.no_grad():
                draw.target = self.predict(teacher, draw.noisy, draw.timesteps, conditioning).to(draw.target.dtype)
        if anchor is None:
            return LossOutput(self.squared_error(pred, draw.target), draw.indices, draw.weights)
        mask = anchor.mask
        with torch.no_grad():
            draw.target[mask] = self.predict(denoiser, draw.noisy[mask], draw.timesteps[mask],
                                             anchor.conditioning).to(draw.target.dtype)
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

