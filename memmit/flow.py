"""Flow-matching transformer pipelines: SD3 (StableDiffusion3Pipeline with an SD3Transformer2DModel) and Flux
(FluxPipeline with a FluxTransformer2DModel), trained by rectified flow (noise.FlowMatchNoise) on VAE latents and
conditioned as diffusers' SD3 and Flux training examples condition them."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

from .noise import FlowMatchNoise
from .tasks import TextToImageTask


class FlowMatchingTask(TextToImageTask):
    """What SD3 and Flux share: a transformer denoising VAE latents shifted and scaled by the VAE's config
    (TextToImageTask.per_sample_loss), rectified-flow noise, the pipeline's own sampler, and a T5 encoder whose
    prompts are `max_sequence_length` tokens long in training as in rendering."""

    # Timestep indices pooled into 50 bank entries: on the SD3 testbed AGC then skipped 81 % of the duplicates'
    # visits and 1.0 % of the unique images' (one entry per index: 46 % and 4.3 %; EFFICACY.md).
    default_agc_bank_bins = 50
    t5_tokenizer: str  # the tokenizer part padded to max_sequence_length
    default_max_sequence_length: int  # the pipeline's own default, what it renders with
    default_weighting_scheme: str  # the family's diffusers training example's

    def __init__(self, pipeline: DiffusionPipeline, weighting_scheme: Optional[str] = None, logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, max_sequence_length: Optional[int] = None,
                 snr_gamma: Optional[float] = None, **options):
        if snr_gamma is not None:
            raise ValueError(f"snr_gamma: min-SNR weighting is for DDPM-trained pipelines; {type(pipeline).__name__} "
                             "is trained by flow matching, weighted by --weighting_scheme")
        t5 = getattr(pipeline, self.t5_tokenizer, None)
        # The pipeline renders with its default length; a T5 tokenizer made for shorter prompts caps it.
        self.max_sequence_length = max_sequence_length or min(self.default_max_sequence_length,
                                                              t5.model_max_length if t5 is not None else math.inf)
        noise = FlowMatchNoise(pipeline.scheduler.config, weighting_scheme or self.default_weighting_scheme, logit_mean,
                               logit_std, mode_scale)
        super().__init__(pipeline, noise=noise, **options)

    def token_lengths(self) -> tuple[int, ...]:
        return tuple(self.max_sequence_length if name == self.t5_tokenizer else tokenizer.model_max_length
                     for name, tokenizer in zip(self.tokenizer_parts, self.tokenizers))

    @property
    def sampler(self) -> str:
        return type(self.pipeline.scheduler).__name__.removesuffix("Scheduler")

    def sampling_scheduler(self):
        return type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)

    def render_options(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def pipeline_options(self) -> dict:
        return {}

    def denoiser_kwargs(self, hidden: torch.Tensor, pooled: Optional[torch.Tensor],
                        time_ids: Optional[torch.Tensor] = None) -> dict:
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}


class StableDiffusion3Task(FlowMatchingTask):
    """SD3: the transformer attends to both CLIP encoders' penultimate hidden states side by side, zero-padded to
    T5's width, followed by T5's tokens (zeros where the pipeline has no text_encoder_3), and takes both CLIP
    encoders' pooled projections side by side."""

    family = "SD3"
    text_parts = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_parts = ("tokenizer", "tokenizer_2", "tokenizer_3")
    optional_parts = ("text_encoder_3", "tokenizer_3")  # SD3 renders without T5, as the pipeline does
    pipeline_class = StableDiffusion3Pipeline
    t5_tokenizer = "tokenizer_3"
    default_max_sequence_length = 256
    default_weighting_scheme = "logit_normal"

    @classmethod
    def check_conditioning(cls, pipeline: DiffusionPipeline) -> None:
        t5 = pipeline.text_encoder_3
        _check_transformer(pipeline, [
            ("pooled_projection_dim", "text_encoder's + text_encoder_2's projection_dim",
             pipeline.text_encoder.config.projection_dim + pipeline.text_encoder_2.config.projection_dim),
            *([("joint_attention_dim", "text_encoder_3's d_model", t5.config.d_model)] if t5 is not None else []),
            ("in_channels", "the VAE's latent_channels", pipeline.vae.config.latent_channels)])

    @classmethod
    def resolution_multiple(cls, pipeline: DiffusionPipeline, vae_scale_factor: int) -> tuple[int, str]:
        patch = pipeline.transformer.config.patch_size
        return vae_scale_factor * patch, (f"its VAE downsamples the image by {vae_scale_factor} and its transformer "
                                          f"takes {patch} x {patch} patches")

    def encode_tokens(self, tokens: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """diffusers' SD3 encode_prompt, the T5 part `max_sequence_length` tokens long."""
        hidden, pooled = [], []
        for encoder, ids in zip(self.text_encoders[:2], tokens):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(hidden, dim=-1)
        width = self.denoiser.config.joint_attention_dim
        if len(tokens) == 3:
            t5 = self.text_encoders[2](tokens[2])[0]
        else:
            t5 = clip.new_zeros(len(clip), self.max_sequence_length, width)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict) -> torch.Tensor:
        return denoiser(hidden_states=noisy, timestep=timesteps, **conditioning).sample


class FluxTask(FlowMatchingTask):
    """Flux: the transformer takes the latents packed into 2 x 2 patches with their positions, T5's tokens, CLIP's
    pooled output, the timestep / 1000 and, for a guidance-distilled model (FLUX.1 dev), the guidance scale."""

    family = "Flux"
    text_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    pipeline_class = FluxPipeline
    t5_tokenizer = "tokenizer_2"
    default_max_sequence_length = 512
    default_weighting_scheme = "none"

    def __init__(self, pipeline: DiffusionPipeline, guidance_scale: float = 3.5, **options):
        self.guidance_scale = guidance_scale  # diffusers' Flux example trains FLUX.1 dev at its rendering default
        super().__init__(pipeline, **options)

    @classmethod
    def check_conditioning(cls, pipeline: DiffusionPipeline) -> None:
        _check_transformer(pipeline, [
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

    def encode_tokens(self, tokens: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """diffusers' Flux encode_prompt: T5's last hidden states, and CLIP's pooled output."""
        pooled = self.text_encoders[0](tokens[0], output_hidden_states=False).pooler_output
        return self.text_encoders[1](tokens[1], output_hidden_states=False)[0], pooled

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


def _check_transformer(pipeline: DiffusionPipeline, widths: list[tuple[str, str, int]]) -> None:
    """Refuse a transformer whose config option does not match the part that feeds it: (option, the part's
    width, its value)."""
    config = pipeline.transformer.config
    for option, source, expected in widths:
        if config[option] != expected:
            raise ValueError(f"pipeline {type(pipeline).__name__}'s transformer {option} {config[option]} does not "
                             f"match {source}, {expected}")
