"""Which task trains which pipeline: the supported families, told apart by pipeline class and denoiser."""

from __future__ import annotations

from diffusers import (FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel, UNet2DModel)

from ..config import TEXT_TO_IMAGE_OPTIONS, options_given
from ..data.captions import CAPTION_OPTIONS
from .base import DenoisingTask, denoiser_component, load_pipeline, replace_vae
from .flux import FluxTask
from .sd3 import StableDiffusion3Task
from .sdxl import StableDiffusionXLTask
from .stable_diffusion import TextToImageTask
from .unconditional import UnconditionalTask

IMAGE_OPTIONS = ("resolution", "center_crop", "random_flip", "image_column")
TEXT_OPTIONS = ("caption_dropout", "snr_gamma", "validation_prompts", *CAPTION_OPTIONS)
FLOW_OPTIONS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "max_sequence_length")
# (pipeline class, denoiser class) -> the task; the first match wins, so a subclass goes before its parent.
TEXT_TO_IMAGE = [((StableDiffusionXLPipeline, UNet2DConditionModel), StableDiffusionXLTask, ()),
                 ((object, UNet2DConditionModel), TextToImageTask, ()),
                 ((StableDiffusion3Pipeline, SD3Transformer2DModel), StableDiffusion3Task, FLOW_OPTIONS),
                 ((FluxPipeline, FluxTransformer2DModel), FluxTask, FLOW_OPTIONS + ("guidance_scale",))]
SUPPORTED = ("UNet2DModel pipelines such as DDPMPipeline and DDIMPipeline, Stable Diffusion 1.x/2.x, SDXL, SD3 and "
             "Flux")


def _options(cfg, names: tuple[str, ...]) -> dict:
    """The config options a task takes; a partial config (e.g. memmit eval's) leaves the task's defaults."""
    return {name: getattr(cfg, name) for name in names if hasattr(cfg, name)}


def load_task(cfg, captions: bool = True) -> DenoisingTask:
    """The task for the pipeline `cfg.pretrained_model_name_or_path` points to; a text-to-image one needs
    `cfg.caption_column` unless `captions` is False (prompts that come from elsewhere)."""
    pipeline = load_pipeline(cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant)
    if vae := getattr(cfg, "pretrained_vae_model_name_or_path", None):
        replace_vae(pipeline, vae)
    name = type(pipeline).__name__
    denoiser = getattr(pipeline, denoiser_component(pipeline))
    if isinstance(denoiser, UNet2DModel):
        if given := options_given(cfg, TEXT_TO_IMAGE_OPTIONS):
            raise ValueError(f"{', '.join(given)}: text-to-image options, and {name} is unconditional (it has no "
                             "text to caption)")
        return UnconditionalTask(pipeline, **_options(cfg, IMAGE_OPTIONS))
    for (pipeline_class, denoiser_class), task, options in TEXT_TO_IMAGE:
        if isinstance(pipeline, pipeline_class) and isinstance(denoiser, denoiser_class):
            if captions and getattr(cfg, "caption_column", None) is None:
                raise ValueError("caption_column is required for text-to-image pipelines (pass --caption_column "
                                 f"with the dataset column of captions to train {name})")
            return task(pipeline, **_options(cfg, IMAGE_OPTIONS + ("caption_column", "dedup_anchor_weight",
                                                                     "dedup_anchor_noisiest")
                                             + TEXT_OPTIONS + options))
    raise ValueError(f"pipeline {name} with a {type(denoiser).__name__} is not supported yet (supported: "
                     f"{SUPPORTED})")
