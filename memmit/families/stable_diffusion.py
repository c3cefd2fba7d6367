"""Stable Diffusion 1.x/2.x (StableDiffusionPipeline), and what every latent text-to-image family builds on: frozen
VAE and text encoders, latents sampled per sample, text conditioning (cached or encoded in the step), anchored
captions and rendering with the pipeline class."""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from diffusers.training_utils import compute_snr

from ..data.captions import CaptionNoise, caption_vocabulary
from ..data.dataset import pick_caption
from ..draws import per_sample_randn
from .base import Anchor, DenoisingTask, LossOutput, check_resolution, denoiser_component, images_nchw, side
from .inputs import CaptionedImageInputs
from .text import TextEncoders, frozen_copy

NUM_DEFAULT_PROMPTS = 4  # training captions rendered at each round's end when no validation_prompts are given


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), expressed for the scheduler's prediction target."""
    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped



class TextToImageTask(DenoisingTask):
    """Stable Diffusion 1.x/2.x: a UNet2DConditionModel denoising VAE latents, conditioned on CLIP text.

    The VAE and the text encoders (`text`, a TextEncoders) stay frozen; they run in the mixed-precision dtype as
    working copies, so the pipeline keeps its original weights and `save_pipeline` writes them unchanged. A family
    with other text conditioning names its TextEncoders class and its denoiser's conditioning arguments.
    """

    default_agc_lambda = 0.8  # the paper's mem_ratio 1.25 for Stable Diffusion
    family = "Stable Diffusion 1.x/2.x"
    text_class: type[TextEncoders] = TextEncoders
    pipeline_class: type = StableDiffusionPipeline  # what the round-end samples render with
    inputs_class: type = CaptionedImageInputs

    def __init__(self, pipeline: DiffusionPipeline, resolution: Optional[int] = None,
                 center_crop: bool = False, random_flip: bool = False, image_column: str = "image",
                 caption_column: Optional[str] = None, caption_dropout: float = 0.0,
                 snr_gamma: Optional[float] = None, validation_prompts: Optional[list[str]] = None,
                 caption_replace_prob: float = 0.0, caption_insert_prob: float = 0.0, caption_repeat_prob: float = 0.0,
                 text_embedding_noise: float = 0.0, dedup_anchor_weight: float = 1.0,
                 dedup_anchor_noisiest: float = 1.0, noise=None):
        self.check_parts(pipeline)
        vae = pipeline.vae
        self.vae_scale_factor = vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = resolution or self.default_side(pipeline) * vae_scale_factor
        check_resolution(resolution, *self.resolution_multiple(pipeline, vae_scale_factor))
        super().__init__(pipeline, resolution, int(vae.config.in_channels), center_crop, random_flip, image_column,
                         noise)
        self.text = self.text_class(pipeline, **self.text_options())
        self.caption_column = caption_column
        self.extra_columns = (caption_column,) if caption_column else ()
        self.snr_gamma = snr_gamma
        self.inputs = self.inputs_class(
            image_column, self.transform, caption_column, caption_dropout,
            CaptionNoise(caption_replace_prob, caption_insert_prob, caption_repeat_prob), self.text.tokenizers,
            self.text.lengths())
        self.text_embedding_noise = text_embedding_noise
        self.anchor_weight = dedup_anchor_weight
        self.anchor_noisiest = dedup_anchor_noisiest
        # Forget mode's retained renders train towards this frozen copy of the input denoiser (retain_distill).
        self.teacher: Optional[torch.nn.Module] = None
        self.validation_prompts = validation_prompts
        self.default_prompts: list[str] = []
        self.vae = vae
        self.weight_dtype = torch.float32

    @classmethod
    def check_parts(cls, pipeline: DiffusionPipeline) -> None:
        """Refuse, naming the part, a pipeline this task would train wrongly (a part missing, other conditioning,
        inpainting)."""
        required = ["vae", *cls.text_class.required_parts()]
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
        check_latent_channels(pipeline)

    @classmethod
    def default_side(cls, pipeline: DiffusionPipeline) -> int:
        """The denoiser's default latent side (resolution / the VAE's downsampling)."""
        return side(getattr(pipeline, denoiser_component(pipeline)).config.sample_size)

    @classmethod
    def resolution_multiple(cls, pipeline: DiffusionPipeline, vae_scale_factor: int) -> tuple[int, str]:
        """What every resolution must be a multiple of, and why."""
        # The UNet2DConditionModel takes latents of any size; the VAE and the pipelines do not.
        return math.lcm(vae_scale_factor, 8), (f"its VAE downsamples the image by {vae_scale_factor} and "
                                               f"{type(pipeline).__name__} renders only multiples of 8")

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype the frozen VAE runs in."""
        return weight_dtype

    def text_options(self) -> dict:
        """text_class's arguments besides the pipeline."""
        return {}

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Frozen working copies of the VAE and text encoders on the device, in the mixed-precision dtype."""
        self.vae = frozen_copy(self.pipeline.vae, device, self.vae_dtype(weight_dtype))
        self.text.prepare(device, weight_dtype)
        self.weight_dtype = weight_dtype

    def denoiser_kwargs(self, hidden: torch.Tensor, pooled: Optional[torch.Tensor],
                        time_ids: Optional[torch.Tensor] = None) -> dict:
        """The denoiser's conditioning arguments."""
        return {"encoder_hidden_states": hidden}

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
            if "latent_mean" in batch:  # --cache_latents (families/latents.py)
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
            text, pooled = self.text.of_batch(batch, device)
            if self.text_embedding_noise:  # Somepalli et al.'s GNI: the same caption never conditions alike twice
                text = text + self.text_embedding_noise * per_sample_randn(text.shape[1:], generators).to(device)
            time_ids = batch.get("time_ids")
            anchor = None
            if "anchored" in batch:
                mask = batch["anchored"].to(device)
                anchor_text, anchor_pooled = self.text.encoded(batch, "anchor_ids", device, mask)
                anchor = Anchor(mask, self.denoiser_kwargs(anchor_text, anchor_pooled,
                                                           None if time_ids is None else time_ids[mask.cpu()]),
                                self.anchor_noisiest)
        out = self.denoising_loss(denoiser, latents, generators, device, anchor, self.teacher,
                                  **self.denoiser_kwargs(text, pooled, time_ids))
        if self.snr_gamma is not None:
            out.weights = min_snr_weights(self.scheduler, out.timesteps.to(device), self.snr_gamma,
                                          self.noise.prediction_type)
        if anchor is not None and self.anchor_weight != 1:
            # A copied caption keeps one anchored sample per epoch, where its copies had dozens: its loss weight
            # sets how fast that caption unlearns the image (EFFICACY.md measured 1, 4 and 8).
            weights = torch.ones_like(out.losses) if out.weights is None else out.weights
            out.weights = torch.where(anchor.mask, self.anchor_weight * weights, weights)
        return out

    def encode_pixels(self, pixels: torch.Tensor, device: torch.device):
        """The VAE's latent distribution of pixels; a VAE kept in fp32 under fp16 (vae_dtype) runs outside
        autocast, which would run its convolutions in fp16 again."""
        upcast = self.vae.dtype != self.weight_dtype
        with torch.autocast(device.type, enabled=False) if upcast else contextlib.nullcontext():
            return self.vae.encode(pixels.to(device, self.vae.dtype)).latent_dist

    def pipeline_options(self) -> dict:
        """pipeline_class's arguments besides its models, for the round-end samples."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def sampling_scheduler(self):
        """What renders samples: DDIM from the pipeline's scheduler config."""
        return DDIMScheduler.from_config(self.pipeline.scheduler.config)

    def set_sampling_timesteps(self, scheduler, num_inference_steps: int) -> None:
        """sampling_scheduler's schedule of num_inference_steps, as the pipeline sets it."""
        scheduler.set_timesteps(num_inference_steps)

    def render_options(self) -> dict:
        """pipeline_class's call arguments besides the prompts, size, steps and generator."""
        return {}

    @torch.no_grad()
    def sample(self, denoiser: torch.nn.Module, num_images: int, num_inference_steps: int,
               generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Images in [0, 1], NCHW on the CPU, from pipeline_class with sampling_scheduler (DDIM from the pipeline's
        scheduler config; flow matching: its own sampler), cycling over validation_prompts (else the default
        prompts, else the empty prompt)."""
        parts = {**self.text.components(), self.denoiser_name: denoiser}
        pipe = self.pipeline_class(vae=self.vae, scheduler=self.sampling_scheduler(), **parts, **self.pipeline_options())
        pipe.set_progress_bar_config(disable=True)
        prompts = self.validation_prompts or self.default_prompts or [""]
        prompts = [prompts[i % len(prompts)] for i in range(num_images)]
        # The frozen parts run in weight_dtype and the denoiser in fp32, as in training.
        with torch.autocast(denoiser.device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32):
            out = pipe(prompts, height=self.resolution, width=self.resolution, num_inference_steps=num_inference_steps,
                       generator=generator, output_type="np", **self.render_options()).images
        return images_nchw(out)


def check_latent_channels(pipeline: DiffusionPipeline) -> None:
    unet, vae = pipeline.unet, pipeline.vae
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"pipeline {type(pipeline).__name__}'s UNet takes {unet.config.in_channels} input channels, "
                         f"not the VAE's {vae.config.latent_channels} latent channels (e.g. inpainting); not supported")
