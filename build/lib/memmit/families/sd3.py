"""SD3 (StableDiffusion3Pipeline with an SD3Transformer2DModel), conditioned as diffusers' SD3 example conditions it."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

from .flow import FlowMatchingTask, T5TextEncoders, check_transformer
from .text import Conditioning


class SD3TextEncoders(T5TextEncoders):
    """diffusers' SD3 encode_prompt: both CLIP encoders' penultimate hidden states side by side, zero-padded to T5's
    width, followed by T5's tokens (`max_sequence_length` of them; zeros where the pipeline has no text_encoder_3),
    and both CLIP encoders' pooled projections side by side."""

    parts = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_parts = ("tokenizer", "tokenizer_2", "tokenizer_3")
    optional_parts = ("text_encoder_3", "tokenizer_3")  # SD3 renders without T5, as the pipeline does
    t5_tokenizer = "tokenizer_3"

    def encode_tokens(self, tokens: Sequence[torch.Tensor]) -> Conditioning:
        hidden, pooled = [], []
        for encoder, ids in zip(self.encoders[:2], tokens):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        width = self.pipeline.transformer.config.joint_attention_dim
        if len(tokens) == 3:
            t5 = self.encoders[2](tokens[2])[0]
        else:
            t5 = clip.new_zeros(len(clip), self.max_sequence_length, width)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)


class StableDiffusion3Task(FlowMatchingTask):
    """SD3: the transformer attends to both CLIP encoders' penultimate hidden states side by side, zero-padded to
    T5's width, followed by T5's tokens (zeros where the pipeline has no text_encoder_3), and takes both CLIP
    encoders' pooled projections side by side."""

    family = "SD3"
    text_class = SD3TextEncoders
    pipeline_class = StableDiffusion3Pipeline
    default_max_sequence_length = 256
    default_weighting_scheme = "logit_normal"

    @classmethod
    def check_conditioning(cls, pipeline: DiffusionPipeline) -> None:
        t5 = pipeline.text_encoder_3
        check_transformer(pipeline, [
            ("pooled_projection_dim", "text_encoder's + text_encoder_2's projection_dim",
             pipeline.text_encoder.config.projection_dim + pipeline.text_encoder_2.config.projection_dim),
            *([("joint_attention_dim", "text_encoder_3's d_model", t5.config.d_model)] if t5 is not None else []),
            ("in_channels", "the VAE's latent_channels", pipeline.vae.config.latent_channels)])

    @classmethod
    def resolution_multiple(cls, pipeline: DiffusionPipeline, vae_scale_factor: int) -> tuple[int, str]:
        patch = pipeline.transformer.config.patch_size
        return vae_scale_factor * patch, (f"its VAE downsamples the image by {vae_scale_factor} and its transformer "
                                          f"takes {patch} x {patch} patches")

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=timesteps, **conditioning).sample
