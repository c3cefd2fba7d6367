"""Pipeline kinds: what to load, how to compute per-sample losses, how to rebuild the pipeline.

A task owns the frozen parts and the noise scheduler; the trainer owns the trainable UNet. Add a
pipeline kind by writing one more Task subclass and naming it in `load_task`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DiffusionPipeline, UNet2DModel

from .data import ImageTransform

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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
    if "unet" not in index:
        raise ValueError(f"pipeline {index.get('_class_name')} at {name_or_path!r} has no UNet; "
                         "memmit trains pipelines with a `unet` component")
    return DiffusionPipeline.from_pretrained(name_or_path, revision=revision, variant=variant)


@dataclass
class LossOutput:
    """Per-sample fp32 losses (what AGC reads), their timesteps (CPU), and optional loss weights (e.g. min-SNR)."""

    losses: torch.Tensor
    timesteps: torch.Tensor
    weights: Optional[torch.Tensor] = None


class UnconditionalTask:
    """DDPMPipeline / DDIMPipeline: a UNet2DModel denoising pixels, no conditioning."""

    default_agc_lambda = 0.5  # the paper's mem_ratio 2.0 for pixel-space models
    extra_columns: tuple[str, ...] = ()  # dataset columns needed besides the image column

    def __init__(self, pipeline: DiffusionPipeline, resolution: Optional[int] = None,
                 center_crop: bool = False, random_flip: bool = False, image_column: str = "image"):
        self.pipeline = pipeline
        self.image_column = image_column
        self.unet: UNet2DModel = pipeline.unet
        self.scheduler = pipeline.scheduler
        self.prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        size = self.unet.config.sample_size
        self.resolution = resolution or (size if isinstance(size, int) else size[0])
        self.channels = int(self.unet.config.in_channels)
        self.transform = ImageTransform(self.resolution, self.channels, center_crop, random_flip)

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move frozen parts to the device in the mixed-precision dtype; an unconditional UNet has none."""

    def batch(self, rows: dict, generator: torch.Generator) -> dict:
        """Model inputs for dataset rows (random crops/flips drawn from the shard's generator)."""
        return {"pixels": torch.stack([self.transform(img, generator) for img in rows[self.image_column]])}

    def per_sample_loss(self, unet: torch.nn.Module, batch: dict, generator: torch.Generator,
                        device: torch.device) -> LossOutput:
        """Unreduced fp32 loss per sample and its timestep.

        Randomness is drawn on the CPU from the shard's generator, noise first then timesteps,
        so a run is reproducible on any device and resumable exactly.
        """
        x0 = batch["pixels"]
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=generator)
        x0, noise, t = x0.to(device), noise.to(device), timesteps.to(device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t).sample
        return LossOutput(self.loss_from_prediction(pred, x0, noise, t), timesteps)

    def loss_from_prediction(self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                             t: torch.Tensor) -> torch.Tensor:
        """mean over C,H,W of (prediction - target)^2 in fp32; the target follows prediction_type."""
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)

    @torch.no_grad()
    def sample(self, unet: torch.nn.Module, num_images: int, num_inference_steps: int,
               generator: torch.Generator) -> torch.Tensor:
        """Images in [0, 1], NCHW on the CPU, sampled with DDIM from this task's scheduler config."""
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(self.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=num_images, generator=generator, num_inference_steps=num_inference_steps,
                   output_type="np").images
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def save_pipeline(self, unet: torch.nn.Module, output_dir: str | Path) -> None:
        """The original pipeline class with the trained UNet, safetensors only."""
        self.pipeline.unet = unet
        self.pipeline.save_pretrained(output_dir, safe_serialization=True)


def load_task(cfg) -> UnconditionalTask:
    """The task for the pipeline `cfg.pretrained_model_name_or_path` points to."""
    pipeline = load_pipeline(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
    if isinstance(pipeline.unet, UNet2DModel):
        return UnconditionalTask(pipeline, cfg.resolution, cfg.center_crop, cfg.random_flip,
                                 getattr(cfg, "image_column", "image"))
    raise ValueError(f"pipeline {type(pipeline).__name__} with a {type(pipeline.unet).__name__} is not supported yet "
                     "(supported: UNet2DModel pipelines such as DDPMPipeline and DDIMPipeline)")
