"""What the flow-matching transformer families (SD3: sd3.py, Flux: flux.py) share: rectified-flow noise
(noise.FlowMatchNoise) on VAE latents, the pipeline's own sampler, and a T5 encoder whose prompts are
`max_sequence_length` tokens long in training as in rendering."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from .noise import FlowMatchNoise
from .stable_diffusion import TextToImageTask
from .text import TextEncoders


class T5TextEncoders(TextEncoders):
    """Text encoders with a T5 among them, whose prompts are `max_sequence_length` tokens long."""

    t5_tokenizer: str  # the tokenizer part padded to max_sequence_length

    def __init__(self, pipeline: DiffusionPipeline, max_sequence_length: int):
        super().__init__(pipeline)
        self.max_sequence_length = max_sequence_length

    def lengths(self) -> tuple[int, ...]:
        return tuple(self.max_sequence_length if name == self.t5_tokenizer else tokenizer.model_max_length
                     for name, tokenizer in zip(self.tokenizer_names, self.tokenizers))


class FlowMatchingTask(TextToImageTask):
    """What SD3 and Flux share: a transformer denoising VAE latents shifted and scaled by the VAE's config
    (TextToImageTask.per_sample_loss), rectified-flow noise, the pipeline's own sampler, and a T5 encoder whose
    prompts are `max_sequence_length` tokens long in training as in rendering."""

    # Timestep indices pooled into 50 bank entries: on the SD3 testbed AGC then skipped 81 % of the duplicates'
    # visits and 1.0 % of the unique images' (one entry per index: 46 % and 4.3 %; EFFICACY.md).
    default_agc_bank_bins = 50
    text_class: type[T5TextEncoders]
    default_max_sequence_length: int  # the pipeline's own default, what it renders with
    default_weighting_scheme: str  # the family's diffusers training example's

    def __init__(self, pipeline: DiffusionPipeline, weighting_scheme: Optional[str] = None, logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, max_sequence_length: Optional[int] = None,
                 snr_gamma: Optional[float] = None, **options):
        if snr_gamma is not None:
            raise ValueError(f"snr_gamma: min-SNR weighting is for DDPM-trained pipelines; {type(pipeline).__name__} "
                             "is trained by flow matching, weighted by --weighting_scheme")
        t5 = getattr(pipeline, self.text_class.t5_tokenizer, None)
        # The pipeline renders with its default length; a T5 tokenizer made for shorter prompts caps it.
        self.max_sequence_length = max_sequence_length or min(self.default_max_sequence_length,
                                                              t5.model_max_length if t5 is not None else math.inf)
        noise = FlowMatchNoise(pipeline.scheduler.config, weighting_scheme or self.default_weighting_scheme, logit_mean,
                               logit_std, mode_scale)
        super().__init__(pipeline, noise=noise, **options)

    def text_options(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    @property
    def sampler(self) -> str:
        return type(self.pipeline.scheduler).__name__.removesuffix("Scheduler")

    def sampling_scheduler(self):
        return type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)

    def set_sampling_timesteps(self, scheduler, num_inference_steps: int) -> None:
        """As the pipeline sets them: a dynamically shifted schedule (Flux's) takes its shift from the image's token
        count; sampling_sigmas, where the pipeline gives them."""
        config, mu = scheduler.config, None
        if config.get("use_dynamic_shifting"):
            tokens = (self.resolution // self.resolution_multiple(self.pipeline, self.vae_scale_factor)[0]) ** 2
            mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        scheduler.set_timesteps(num_inference_steps, sigmas=self.sampling_sigmas(scheduler, num_inference_steps),
                                mu=mu)

    def sampling_sigmas(self, scheduler, num_inference_steps: int) -> Optional[np.ndarray]:
        """The sigmas the pipeline passes its scheduler (SD3's: none, the scheduler spaces its own)."""
        return None

    def render_options(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def pipeline_options(self) -> dict:
        return {}

    def denoiser_kwargs(self, hidden: torch.Tensor, pooled: Optional[torch.Tensor],
                        time_ids: Optional[torch.Tensor] = None) -> dict:
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}


def check_transformer(pipeline: DiffusionPipeline, widths: list[tuple[str, str, int]]) -> None:
    """Refuse a transformer whose config option does not match the part that feeds it: (option, the part's
    width, its value)."""
    config = pipeline.transformer.config
    for option, source, expected in widths:
        if config[option] != expected:
            raise ValueError(f"pipeline {type(pipeline).__name__}'s transformer {option} {config[option]} does not "
                             f"match {source}, {expected}")
