"""Flux (FluxPipeline with a FluxTransformer2DModel), conditioned as diffusers' Flux example conditions it."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from .flow import FlowMatchingTask, T5TextEncoders, check_transformer
from .text import Conditioning


class FluxTextEncoders(T5TextEncoders):
    """diffusers' Flux encode_prompt: T5's last hidden states, and CLIP's pooled output."""

    parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    t5_tokenizer = "tokenizer_2"

    def encode_tokens(self, tokens: Sequence[torch.Tensor]) -> Conditioning:
        pooled = self.encoders[0](tokens[0], output_hidden_states=False).pooler_output
        return self.encoders[1](tokens[1], output_hidden_states=False)[0], pooled


class FluxTask(FlowMatchingTask):
    """Flux: the transformer takes the latents packed into 2 x 2 patches with their positions, T5's tokens, CLIP's
    pooled output, the timestep / 1000 and, for a guidance-distilled model (FLUX.1 dev), the guidance scale."""

    family = "Flux"
    text_class = FluxTextEncoders
    pipeline_class = FluxPipeline
    default_max_sequence_length = 512
    default_weighting_scheme = "none"

    def __init__(self, pipeline: DiffusionPipeline, guidance_scale: float = 3.5, **options):
        self.guidance_scale = guidance_scale  # diffusers' Flux example trains FLUX.1 dev at its rendering default
        super().__init__(pipeline, **options)

    @classmethod
    def check_conditioning(cls, pipeline: DiffusionPipeline) -> None:
        check_transformer(pipeline, [
            ("in_channels", "4 x the VAE's latent_channels (Flux packs 2 x 2 latent patches)",
             4 * pipeline.vae.config.latent_channels),
            ("pooled_projection_dim", "text_encoder's hidden_size", pipeline.text_encoder.config.hidden_size),
            ("joint_attention_dim", "text_encoder_2's d_model", pipeline.text_encoder_2.config.d_model)])

    @classmethod
    def resolution_multiple(cls, pipeline: DiffusionPipeline, vae_scale_factor: int) -> tuple[int, str]:
        return 2 * vae_scale_factor, (f"its VAE downsamples the image by {vae_scale_factor} and Flux packs 2 x 2 "
                                      "latent patches")

    @classmethod
    def default_side(cls, pipeline: DiffusionPipeline) -> int:
        return 128  # FluxPipeline's default_sample_size, in latents

    def sampling_sigmas(self, scheduler, num_inference_steps: int) -> Optional[np.ndarray]:
        """FluxPipeline's: evenly from 1 to 1 / steps, before the shift (none for a scheduler with flow sigmas)."""
        if scheduler.config.get("use_flow_sigmas"):
            return None
        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict) -> torch.Tensor:
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        hidden = conditioning["encoder_hidden_states"]
        guidance = (torch.full((b,), self.guidance_scale, device=noisy.device)
                    if denoiser.config.guidance_embeds else None)
        out = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       txt_ids=hidden.new_zeros(hidden.shape[1], 3),
                       img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
                       **conditioning).sample
        return FluxPipeline._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                            self.vae_scale_factor)
