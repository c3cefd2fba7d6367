"""The run's fixed shard split: K disjoint shards of sample ids covering the data (a seeded permutation, contiguous,
or stratified by label), near-duplicate clusters kept whole or reduced to one copy. Built once, here, from the config."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import datasets
import torch
from accelerate.logging import get_logger
from torch import Tensor

from ..workers import Workers
from .captions import ANCHORS, anchor_captions, cluster_captions, plan_anchors
from .dataset import source_names
from .dedup import cluster_report
from .detectors import Detector, threshold_for
from .feature_store import stored_features

if TYPE_CHECKING:
    from ..config import MemmitConfig

logger = get_logger(__name__)


@dataclass
class Split:
    shards: list[list[int]]
    duplicates: Optional[dict] = None  # the cluster report (memmit/duplicates.json) when dedup ran
    captions: dict[int, list[str]] = field(default_factory=dict)  # dedup_captions: a kept copy's captions
    anchors: dict[int, list[str]] = field(default_factory=dict)  # dedup_captions=anchor: an anchored copy's anchors

    def rows(self, ds: datasets.Dataset, ids: list[int], caption_column: Optional[str]) -> dict:
        """The dataset rows of `ids`, a kept copy's caption value replaced by its cluster's captions; with anchored
        copies, the ANCHORS column holds each row's anchor captions ([] for a row that trains as usual)."""
        rows = ds[ids]
        if self.captions:
            rows[caption_column] = [self.captions.get(i, value) for i, value in zip(ids, rows[caption_column])]
        if self.anchors:
            rows[ANCHORS] = [self.anchors.get(i, []) for i in ids]
        return rows


def split_shards(
    num_samples: int,
    num_shards: int,
    strategy: str = "random",
    seed: int = 0,
    labels: Optional[Sequence] = None,
) -> list[list[int]]:
    """K disjoint shards of sample ids covering 0..N-1; no sample is dropped."""
    if num_samples < num_shards:
        raise ValueError(f"{num_samples} samples cannot fill num_shards={num_shards} shards")
    gen = torch.Generator().manual_seed(seed)
    if strategy == "contiguous":
        order = torch.arange(num_samples)
    elif strategy == "random":
        order = torch.randperm(num_samples, generator=gen)
    elif strategy == "stratified":
        if labels is None or len(labels) != num_samples:
            raise ValueError("shard_strategy=stratified needs one label per sample")
        # Deal each label's (shuffled) samples round-robin, continuing across labels, so every
        # shard gets each label's share and shard sizes differ by at most one.
        shards: list[list[int]] = [[] for _ in range(num_shards)]
        slot = 0
        for label in sorted(set(labels), key=repr):
            ids = [i for i, l in enumerate(labels) if l == label]
            for j in torch.randperm(len(ids), generator=gen).tolist():
                shards[slot % num_shards].append(ids[j])
                slot += 1
        return [sorted(s) for s in shards]
    else:
        raise ValueError(f"unknown shard_strategy {strategy!r}")
    return [sorted(c.tolist()) for c in torch.tensor_split(order, num_shards)]


def _units(num_samples: int, clusters: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each cluster as one unit, each other sample as its own; checks ids are valid and disjoint."""
    seen = [False] * num_samples
    units = []
    for cluster in clusters:
        for i in cluster:
            if not 0 <= i < num_samples or seen[i]:
                raise ValueError(f"sample id {i} is out of range or in two clusters")
            seen[i] = True
        units.append(sorted(cluster))
    units.extend([i] for i in range(num_samples) if not seen[i])
    return units


def keep_one(num_samples: int, clusters: Sequence[Sequence[int]]) -> list[int]:
    """Sample ids to train on: every non-duplicate and the smallest id of each cluster, sorted."""
    return sorted(unit[0] for unit in _units(num_samples, clusters))


def split_with_clusters(num_samples: int, num_shards: int, clusters: Sequence[Sequence[int]],
                        strategy: str = "random", seed: int = 0) -> list[list[int]]:
    """K disjoint shards covering 0..N-1, each cluster whole in one shard, sizes balanced.

    Shard sizes differ by at most the largest cluster's size.
    """
    if strategy != "random":
        raise ValueError(f"shard_strategy {strategy!r} cannot keep duplicate clusters together; "
                         "use 'random'")
    units = _units(num_samples, clusters)
    if not 1 <= num_shards <= len(units):
        raise ValueError(f"num_shards={num_shards} must be between 1 and {len(units)}, the number "
                         "of distinct samples (each duplicate cluster counts once)")
    order = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed)).tolist()
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    # Each unit goes to the currently smallest shard (ties: lowest index); empty shards fill first.
    sizes = [(0, k) for k in range(num_shards)]
    for u in order:
        size, k = heapq.heappop(sizes)
        shards[k].extend(units[u])
        heapq.heappush(sizes, (size + len(units[u]), k))
    return [sorted(s) for s in shards]


def duplicate_clusters(ds: datasets.Dataset, image_column: str, detector: Detector, show_progress: bool = True,
                       family_size: int = 0, family_threshold: Optional[float] = None, workers: Workers = Workers(),
                       features_dir: Optional[str] = None) -> list[list[int]]:
    """Exact and near-duplicate clusters of the dataset's images: their features computed by `workers` and kept on
    disk (data/feature_store.py; every process calls this), the search run by the main process, its clusters
    handed to every process."""
    feats = stored_features(detector, ds, image_column, workers, features_dir, show_progress)
    return workers.share(detector.clusters_of(feats, family_size, family_threshold) if workers.index == 0 else None)


def build_split(ds: datasets.Dataset, cfg: MemmitConfig, detector: Detector, show_progress: bool = True,
                embed: Optional[Callable[[list[str]], Tensor]] = None, workers: Workers = Workers()) -> Split:
    """K disjoint shards of sample ids: all of them (dedup none), clusters kept whole (same_shard), or one
    copy per cluster (keep_one). `embed`: captions -> the text encoder's conditioning (dedup_captions=anchor);
    `workers`: the processes that compute the detector's features (every process calls this)."""
    n = len(ds)
    labels = ds[cfg.label_column] if cfg.shard_strategy == "stratified" else None
    if cfg.dedup == "none":
        return Split(split_shards(n, cfg.num_shards, cfg.shard_strategy, cfg.seed, labels))
    family_threshold = threshold_for(cfg.dedup_features, cfg.dedup_threshold, "eval")
    clusters = duplicate_clusters(ds, cfg.image_column, detector, show_progress, cfg.dedup_family_size,
                                  family_threshold, workers, cfg.dedup_features_dir)
    detected = {**detector.describe(), "family_size": cfg.dedup_family_size, "family_threshold": family_threshold}
    report = {"detector": detected, **cluster_report(clusters, source_names(ds, cfg.image_column))}
    logger.info("%d duplicate clusters holding %d samples (dedup=%s)", report["num_clusters"],
                report["num_samples_in_clusters"], cfg.dedup, main_process_only=True)
    if cfg.dedup == "same_shard":
        return Split(split_with_clusters(n, cfg.num_shards, clusters, cfg.shard_strategy, cfg.seed), report)
    # A list, read once: the caption rules index rows one by one (a datasets Column reads Arrow on every index).
    rule = cfg.dedup_captions or "ignore"  # a config the family defaults did not resolve (setup.py) anchors nothing
    values = list(ds[cfg.caption_column]) if rule != "ignore" else []
    if rule == "anchor":
        plan = plan_anchors(values, clusters)
        in_cluster = {i for cluster in clusters for i in cluster}
        kept = sorted([i for i in range(n) if i not in in_cluster] + plan.kept)
        captions, anchors = plan.captions, anchor_captions(values, clusters, plan.copied, embed, cfg.dedup_anchors)
    else:
        kept = keep_one(n, clusters)
        captions = cluster_captions(values, clusters, shared_empty=rule == "empty") if rule != "ignore" else {}
        anchors = {}
    local = split_shards(len(kept), cfg.num_shards, cfg.shard_strategy, cfg.seed,
                         [labels[i] for i in kept] if labels is not None else None)
    if captions:
        report["kept_copies_with_merged_captions"] = len(captions)
    if anchors:
        # What each anchored caption is pulled towards, for the user to read (duplicates.json).
        report["anchored_captions"] = [{"caption": caption, "copies": plan.copies[i], "anchors": anchors[i]}
                                       for i, caption in plan.copied.items()]
        logger.info("%d duplicated captions train towards anchor captions (dedup_captions=anchor)", len(anchors),
                    main_process_only=True)
    return Split([[kept[j] for j in shard] for shard in local], report, captions, anchors)
