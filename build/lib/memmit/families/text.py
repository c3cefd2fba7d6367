"""A family's text conditioning: its frozen tokenizers and text encoders (working copies on the device, in the
mixed-precision dtype) and how prompts become the denoiser's conditioning: hidden states and, for the families that
use one, a pooled embedding, in fp32 for the fp32 denoiser.

TextEncoders is Stable Diffusion 1.x/2.x's (one CLIP encoder's last hidden states); SDXL, SD3 and Flux subclass it
beside their task (sdxl.py, sd3.py, flux.py) and override `encode_tokens`.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from .inputs import TOKEN_SUFFIXES, tokenize

PROMPT_BATCH = 32  # prompts per text-encoder pass outside a training step (the latent cache, anchor choice)

Conditioning = tuple[torch.Tensor, Optional[torch.Tensor]]  # hidden states [N, tokens, width], pooled [N, width]


def fp32(hidden: torch.Tensor, pooled: Optional[torch.Tensor]) -> Conditioning:
    """Text conditioning in fp32 (pooled may be None): it keeps the fp32 denoiser working where autocast is off."""
    return hidden.float(), None if pooled is None else pooled.float()


def frozen_copy(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(module).requires_grad_(False).eval().to(device, dtype)


class TextEncoders:
    """Stable Diffusion 1.x/2.x's text conditioning: one CLIP text encoder's last hidden states."""

    parts: tuple[str, ...] = ("text_encoder",)  # the pipeline's text encoders, in the order of...
    tokenizer_parts: tuple[str, ...] = ("tokenizer",)  # ...their tokenizers (batch keys input_ids, input_ids_2, ...)
    optional_parts: tuple[str, ...] = ()  # parts the pipeline may lack (last ones only)

    def __init__(self, pipeline: DiffusionPipeline):
        # The parts this pipeline has, in order: an optional one may be missing (SD3 without T5).
        self.names = tuple(name for name in self.parts if getattr(pipeline, name, None) is not None)
        self.tokenizer_names = tuple(name for name in self.tokenizer_parts if getattr(pipeline, name, None) is not None)
        self.pipeline = pipeline
        self.tokenizers = tuple(getattr(pipeline, name) for name in self.tokenizer_names)
        self.encoders = [getattr(pipeline, name) for name in self.names]
        self.weight_dtype = torch.float32

    @classmethod
    def required_parts(cls) -> list[str]:
        return [part for part in (*cls.parts, *cls.tokenizer_parts) if part not in cls.optional_parts]

    def lengths(self) -> tuple[int, ...]:
        """Tokens per prompt of each tokenizer."""
        return tuple(tokenizer.model_max_length for tokenizer in self.tokenizers)

    def components(self) -> dict:
        """The pipeline components they are (working copies once prepared), for a pipeline that renders with them;
        a missing optional part as None."""
        return {**dict.fromkeys(self.optional_parts), **dict(zip(self.names, self.encoders)),
                **dict(zip(self.tokenizer_names, self.tokenizers))}

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Frozen working copies on the device, in the mixed-precision dtype: the pipeline keeps its weights."""
        self.encoders = [frozen_copy(getattr(self.pipeline, name), device, weight_dtype) for name in self.names]
        self.weight_dtype = weight_dtype

    def encode_tokens(self, tokens: Sequence[torch.Tensor]) -> Conditioning:
        """The conditioning of tokenized prompts (one tensor per tokenizer): the text encoder's last hidden
        states, and the pooled embedding a family also conditions on (none here)."""
        return self.encoders[0](tokens[0])[0], None

    def encode_text(self, prompts: list[str], device: torch.device) -> Conditioning:
        tokens = tokenize(self.tokenizers, self.lengths(), prompts)
        return self.encode_tokens([ids.to(device) for ids in tokens.values()])

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device, progress: Optional[str] = None
                       ) -> Conditioning:
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
        """Each caption's conditioning, flattened: [N, tokens x width] fp32 on the CPU (dedup_captions=anchor
        compares captions by it)."""
        device = next(self.encoders[0].parameters()).device
        return self.encode_prompts(captions, device)[0].float().flatten(1)

    def encoded(self, batch: dict, key: str, device: torch.device, mask: Optional[torch.Tensor] = None
                ) -> Conditioning:
        """encode_tokens of the batch's tokens under `key` (of the rows `mask` marks), in fp32."""
        tokens = [batch[key + suffix].to(device) for suffix in TOKEN_SUFFIXES[:len(self.tokenizers)]]
        return fp32(*self.encode_tokens([ids if mask is None else ids[mask] for ids in tokens]))

    def of_batch(self, batch: dict, device: torch.device) -> Conditioning:
        """The conditioning of the batch's prompts, fp32; with --cache_latents read from the cache, except for
        prompts the caption rules made up."""
        if "text" not in batch:
            return self.encoded(batch, "input_ids", device)
        text, missing = batch["text"].to(device).float(), batch["encode"].to(device)
        pooled = batch["pooled"].to(device).float() if "pooled" in batch else None
        if missing.any():
            hidden, extra = self.encoded(batch, "input_ids", device, missing)
            text[missing] = hidden
            if pooled is not None:
                pooled[missing] = extra
        return text, pooled
