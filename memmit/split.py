"""The run's fixed shard split, near-duplicate handling included: built once, here, from the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import datasets
import torch
from accelerate.logging import get_logger

from .config import MemmitConfig
from .data import ImageTransform, iter_images, source_names, split_shards
from .dedup import cluster_report, find_duplicate_clusters, keep_one, split_with_clusters

logger = get_logger(__name__)

DEDUP_RESOLUTION = 32  # duplicates are found on small crops: cheap, and blind to resampling noise


@dataclass
class Split:
    shards: list[list[int]]
    duplicates: Optional[dict] = None  # the cluster report (memmit/duplicates.json) when dedup ran


def duplicate_clusters(ds: datasets.Dataset, image_column: str, resolution: int, channels: int, threshold: float,
                       show_progress: bool = True) -> list[list[int]]:
    """Exact and near-duplicate clusters, found on small center crops (every image decoded once)."""
    transform = ImageTransform(min(resolution, DEDUP_RESOLUTION), channels, center_crop=True)
    images = torch.stack([transform(img).flatten()
                          for img in iter_images(ds, image_column, "finding duplicates", show_progress)])
    return find_duplicate_clusters(images, threshold)


def build_split(ds: datasets.Dataset, cfg: MemmitConfig, resolution: int, channels: int,
                show_progress: bool = True) -> Split:
    """K disjoint shards of sample ids: all of them (dedup none), clusters kept whole (same_shard), or one
    copy per cluster (keep_one)."""
    n = len(ds)
    labels = ds[cfg.label_column] if cfg.shard_strategy == "stratified" else None
    if cfg.dedup == "none":
        return Split(split_shards(n, cfg.num_shards, cfg.shard_strategy, cfg.seed, labels))
    clusters = duplicate_clusters(ds, cfg.image_column, resolution, channels, cfg.dedup_threshold, show_progress)
    report = cluster_report(clusters, source_names(ds, cfg.image_column))
    logger.info("%d duplicate clusters holding %d samples (dedup=%s)", report["num_clusters"],
                report["num_samples_in_clusters"], cfg.dedup, main_process_only=True)
    if cfg.dedup == "same_shard":
        return Split(split_with_clusters(n, cfg.num_shards, clusters, cfg.shard_strategy, cfg.seed), report)
    kept = keep_one(n, clusters)
    local = split_shards(len(kept), cfg.num_shards, cfg.shard_strategy, cfg.seed,
                         [labels[i] for i in kept] if labels is not None else None)
    return Split([[kept[j] for j in shard] for shard in local], report)
