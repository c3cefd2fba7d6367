"""The run's fixed shard split, near-duplicate handling included: built once, here, from the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import datasets
from accelerate.logging import get_logger

from .config import MemmitConfig
from .data import iter_images, source_names, split_shards
from .dedup import cluster_report, keep_one, split_with_clusters
from .detectors import Detector, threshold_for

logger = get_logger(__name__)


@dataclass
class Split:
    shards: list[list[int]]
    duplicates: Optional[dict] = None  # the cluster report (memmit/duplicates.json) when dedup ran
    captions: dict[int, list[str]] = field(default_factory=dict)  # dedup_captions: a kept copy's captions

    def rows(self, ds: datasets.Dataset, ids: list[int], caption_column: Optional[str]) -> dict:
        """The dataset rows of `ids`, a kept copy's caption value replaced by its cluster's captions."""
        rows = ds[ids]
        if self.captions:
            rows[caption_column] = [self.captions.get(i, value) for i, value in zip(ids, rows[caption_column])]
        return rows


def duplicate_clusters(ds: datasets.Dataset, image_column: str, detector: Detector, show_progress: bool = True,
                       family_size: int = 0, family_threshold: Optional[float] = None) -> list[list[int]]:
    """Exact and near-duplicate clusters of the dataset's images (every image decoded once)."""
    return detector.clusters(iter_images(ds, image_column, "finding duplicates", show_progress), family_size,
                             family_threshold)


def build_split(ds: datasets.Dataset, cfg: MemmitConfig, detector: Detector, show_progress: bool = True) -> Split:
    """K disjoint shards of sample ids: all of them (dedup none), clusters kept whole (same_shard), or one
    copy per cluster (keep_one)."""
    n = len(ds)
    labels = ds[cfg.label_column] if cfg.shard_strategy == "stratified" else None
    if cfg.dedup == "none":
        return Split(split_shards(n, cfg.num_shards, cfg.shard_strategy, cfg.seed, labels))
    family_threshold = threshold_for(cfg.dedup_features, cfg.dedup_threshold, "eval")
    clusters = duplicate_clusters(ds, cfg.image_column, detector, show_progress, cfg.dedup_family_size,
                                  family_threshold)
    detected = {**detector.describe(), "family_size": cfg.dedup_family_size, "family_threshold": family_threshold}
    report = {"detector": detected, **cluster_report(clusters, source_names(ds, cfg.image_column))}
    logger.info("%d duplicate clusters holding %d samples (dedup=%s)", report["num_clusters"],
                report["num_samples_in_clusters"], cfg.dedup, main_process_only=True)
    if cfg.dedup == "same_shard":
        return Split(split_with_clusters(n, cfg.num_shards, clusters, cfg.shard_strategy, cfg.seed), report)
    kept = keep_one(n, clusters)
    local = split_shards(len(kept), cfg.num_shards, cfg.shard_strategy, cfg.seed,
                         [labels[i] for i in kept] if labels is not None else None)
    captions = (cluster_captions(ds[cfg.caption_column], clusters, shared_empty=cfg.dedup_captions == "empty")
                if cfg.dedup_captions != "ignore" else {})
    if captions:
        report["kept_copies_with_merged_captions"] = len(captions)
    return Split([[kept[j] for j in shard] for shard in local], report, captions)


def cluster_captions(values: list, clusters: list[list[int]], shared_empty: bool = False) -> dict[int, list[str]]:
    """For each cluster whose members hold more than one distinct caption: its kept id (the smallest, as
    keep_one keeps) -> those captions, in order of first appearance (a list-valued row gives all of its own).
    With `shared_empty`, a cluster whose copies share one caption -> [""]: the empty prompt."""
    merged = {}
    for cluster in clusters:
        captions = list(dict.fromkeys(caption for i in sorted(cluster) for caption in
                                      (values[i] if isinstance(values[i], (list, tuple)) else [values[i]])))
        if len(captions) > 1:
            merged[min(cluster)] = captions
        elif shared_empty:
            merged[min(cluster)] = [""]
    return merged
