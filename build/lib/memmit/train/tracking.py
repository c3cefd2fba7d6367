"""Logs that reach the tracker from every process: per-shard loss, skip fraction and lr, and sample grids."""

from __future__ import annotations

import math
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..config import MemmitConfig


def start_trackers(accelerator: Accelerator, cfg: MemmitConfig) -> None:
    if cfg.report_to != "none":
        accelerator.init_trackers("memmit", config={k: v for k, v in cfg.to_dict().items()
                                                    if isinstance(v, (int, float, str, bool))})


def log_step(accelerator: Accelerator, shard: Optional[int], logs: Optional[dict], step: int) -> None:
    """Every process calls this once per loop step, with its shard's values or None when it idled; the main
    process logs them all (accelerator.log alone only sees the main process's own shards)."""
    entries = gather_object([(shard, logs)])
    values = {f"shard_{k}/{name}": v for k, row in entries if row is not None for name, v in row.items()
              if not (isinstance(v, float) and math.isnan(v))}
    if values:
        accelerator.log(values, step=step)


def image_trackers(accelerator: Accelerator) -> list:
    """The started trackers that take images (tensorboard, wandb, aim, clearml, ...)."""
    return [t for t in accelerator.trackers if hasattr(t, "log_images")]


def log_images(accelerator: Accelerator, name: str, images: torch.Tensor, step: int) -> None:
    """NCHW images in [0, 1] to every image tracker."""
    for tracker in image_trackers(accelerator):
        if tracker.name == "tensorboard":
            tracker.log_images({name: images}, step=step)
        else:  # the others take HWC arrays, one per image
            tracker.log_images({name: list(images.permute(0, 2, 3, 1).numpy())}, step=step)
