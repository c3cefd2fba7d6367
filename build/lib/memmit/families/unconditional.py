"""Unconditional pixel-space pipelines (DDPMPipeline, DDIMPipeline): a UNet2DModel denoising pixels."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DiffusionPipeline

from .base import DenoisingTask, LossOutput, check_resolution, images_nchw, side


class UnconditionalTask(DenoisingTask):
    """DDPMPipeline / DDIMPipeline: a UNet2DModel denoising pixels, no conditioning."""

    default_agc_lambda = 0.5  # the paper's mem_ratio 2.0 for pixel-space models

    def __init__(self, pipeline: DiffusionPipeline, resolution: Optional[int] = None,
                 center_crop: bool = False, random_flip: bool = False, image_column: str = "image"):
        unet = pipeline.unet
        resolution = resolution or side(unet.config.sample_size)
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
        return images_nchw(out)

