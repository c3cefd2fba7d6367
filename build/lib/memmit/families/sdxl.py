"""SDXL (StableDiffusionXLPipeline), trained as diffusers' SDXL example trains it."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from .inputs import MicroConditionedInputs
from .stable_diffusion import TextToImageTask, check_latent_channels
from .text import Conditioning, TextEncoders


class SDXLTextEncoders(TextEncoders):
    """diffusers' SDXL encode_prompt: both CLIP encoders' penultimate hidden states concatenated, and the second
    encoder's projected pooled output (CLIPTextModelWithProjection's text_embeds)."""

    parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")

    def encode_tokens(self, tokens: Sequence[torch.Tensor]) -> Conditioning:
        hidden = []
        for encoder, ids in zip(self.encoders, tokens):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), out[0]


class StableDiffusionXLTask(TextToImageTask):
    """SDXL (StableDiffusionXLPipeline): the UNet is conditioned on both CLIP text encoders' penultimate hidden
    states side by side, on the second one's pooled projection, and on each image's original size and crop
    (`time_ids`, recorded by the transform), as diffusers' SDXL training example conditions it."""

    family = "SDXL"
    text_class = SDXLTextEncoders
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
        check_latent_channels(pipeline)

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        # SDXL's own VAE overflows in fp16, which its config says (force_upcast); an fp16-safe replacement
        # (--pretrained_vae_model_name_or_path) says it is not.
        return torch.float32 if weight_dtype == torch.float16 and self.pipeline.vae.config.force_upcast else weight_dtype

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
