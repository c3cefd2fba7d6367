"""Sampling for `memmit eval`: the task loaded to render as training saw images (centre crops), one generator per
sample, batches split across processes, and the training images loaded as the samples are compared with them."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Optional

import datasets
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch import Tensor
from tqdm.auto import tqdm

from ..config import EvalConfig
from ..data.dataset import pick_caption
from ..data.feature_store import stored_features
from ..data.features import Extractor
from ..data.transform import ImageTransform
from ..draws import keyed_generator
from ..families import load_task
from ..families.base import DenoisingTask
from ..families.unconditional import UnconditionalTask
from ..workers import Workers


def to_uint8(images01: Tensor) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> uint8 [N, H, W, C], rounded as diffusers' numpy_to_pil rounds."""
    return (images01 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, C] -> [N, C, H, W] in [-1, 1], exactly as ImageTransform scales training images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def sample_generators(seed: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, sample index): an image depends neither on the device nor
    on which process renders its batch."""
    return [keyed_generator(seed, i) for i in indices]


def load_eval_task(config: EvalConfig) -> DenoisingTask:
    # Samples are compared with whole training images: centre crops, no flips.
    # --detect_prompts brings its own prompts, or says itself that it needs the captions.
    task = load_task(SimpleNamespace(**dataclasses.asdict(config), center_crop=True, random_flip=False),
                     captions=not config.detect_prompts)
    if not isinstance(task, UnconditionalTask):  # Stable Diffusion renders any height and width asked for
        return task
    # DDIMPipeline samples at the UNet's configured sample_size; a convolutional UNet runs at any multiple.
    task.denoiser.register_to_config(sample_size=task.resolution)
    return task


def sample_images(task: DenoisingTask, num_samples: int, num_inference_steps: int, batch_size: int,
                  seed: int, device: torch.device, show_progress: bool = True,
                  prompts: Optional[list[str]] = None, state: Optional[PartialState] = None) -> np.ndarray:
    """DDIM samples as uint8 [N, H, W, C]; a text-to-image task renders `prompts[i]` for sample i.

    Batches are cut at multiples of batch_size whatever the process count; with a distributed `state`, process p
    renders batches p, p + P, ... and every process receives all of them in order, the images one process makes."""
    task.prepare(device, torch.float32)  # frozen parts (VAE, text encoder) to the device, if any
    denoiser = task.denoiser.to(device).eval()
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    mine = []
    for start in tqdm(range(0, num_samples, batch_size)[rank::world], desc="sampling", disable=not show_progress):
        indices = range(start, min(start + batch_size, num_samples))
        if prompts is not None:
            task.validation_prompts = prompts[indices.start:indices.stop]  # the task renders its validation prompts
        images = task.sample(denoiser, len(indices), num_inference_steps, sample_generators(seed, indices))
        mine.append((start, to_uint8(images)))
    batches = gather_object(mine) if world > 1 else mine
    return np.concatenate([images for _, images in sorted(batches, key=lambda batch: batch[0])])


def sample_prompts(captions: list, num_samples: int, seed: int, column: str) -> list[str]:
    """One training caption per sample: a row drawn with a seed, then one of its captions."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(captions), (num_samples,), generator=generator).tolist()
    return [pick_caption(captions[i], generator, column) for i in picks]


class TrainingPixels:
    """The eval's training images as `transform` makes them, flattened: a featurizer (data/feature_store.py), so
    they are decoded once, in chunks written to disk as they go, and a later evaluation of the same data reads them."""

    storage_dtype = "float32"  # as the transform makes them: the metrics compare samples with them exactly

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def feature_key(self) -> dict:
        t = self.transform
        return {"kind": "training pixels", "resolution": t.resolution, "channels": t.channels,
                "center_crop": t.center_crop}

    def images(self, images) -> Tensor:
        """[N, C, H, W] in [-1, 1], as the metrics and the extractors see them."""
        return torch.stack([self.transform(img) for img in images])

    def features(self, images) -> Tensor:
        return self.images(images).flatten(1)


class TrainingEmbeddings:
    """An extractor's (--feature_extractor's, --quality_extractor's) embedding of the eval's training images: a
    featurizer too, so a million training images are embedded by every process, chunk by chunk on disk, once."""

    storage_dtype = "float32"

    def __init__(self, pixels: TrainingPixels, extractor: Extractor, batch_size: int):
        self.pixels, self.extractor, self.batch_size = pixels, extractor, batch_size

    def feature_key(self) -> dict:
        return {**self.pixels.feature_key(), "kind": "training embeddings", "extractor": self.extractor.info,
                "weights": self.extractor.weights}

    def features(self, images) -> Tensor:
        return self.extractor((self.pixels.images(images) + 1) / 2, self.batch_size)


def load_train_images(ds: datasets.Dataset, image_column: str, transform: ImageTransform,
                      show_progress: bool = True, workers: Workers = Workers()) -> Optional[Tensor]:
    """Every training image through `transform` (computed by `workers` and kept on disk, data/feature_store.py),
    stacked: [N, C, H, W] in [-1, 1], on the main process (the others None); an unreadable file fails by name."""
    pixels = stored_features(TrainingPixels(transform), ds, image_column, workers, show_progress=show_progress)
    return None if pixels is None else pixels.view(len(ds), transform.channels, transform.resolution,
                                                   transform.resolution)