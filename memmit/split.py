"""The run's fixed shard split, near-duplicate handling included: built once, here, from the config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import datasets
from accelerate.logging import get_logger
from torch import Tensor

from .captions import ANCHORS
from .config import MemmitConfig
from .data import iter_images, pick_caption, source_names, split_shards
from .dedup import cluster_report, keep_one, split_with_clusters
from .detectors import Detector, threshold_for
from .metrics import nearest_neighbours

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


def duplicate_clusters(ds: datasets.Dataset, image_column: str, detector: Detector, show_progress: bool = True,
                       family_size: int = 0, family_threshold: Optional[float] = None) -> list[list[int]]:
    """Exact and near-duplicate clusters of the dataset's images (every image decoded once)."""
    return detector.clusters(iter_images(ds, image_column, "finding duplicates", show_progress), family_size,
                             family_threshold)


def build_split(ds: datasets.Dataset, cfg: MemmitConfig, detector: Detector, show_progress: bool = True,
                embed: Optional[Callable[[list[str]], Tensor]] = None) -> Split:
    """K disjoint shards of sample ids: all of them (dedup none), clusters kept whole (same_shard), or one
    copy per cluster (keep_one). `embed`: captions -> the text encoder's conditioning (dedup_captions=anchor)."""
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
    # A list, read once: the caption rules index rows one by one (a datasets Column reads Arrow on every index).
    values = list(ds[cfg.caption_column]) if cfg.dedup_captions != "ignore" else []
    kept = keep_one(n, clusters)
    anchors = anchored_copies(values, clusters, embed, cfg.dedup_anchors) if cfg.dedup_captions == "anchor" else {}
    local = split_shards(len(kept), cfg.num_shards, cfg.shard_strategy, cfg.seed,
                         [labels[i] for i in kept] if labels is not None else None)
    captions = (cluster_captions(values, clusters, shared_empty=cfg.dedup_captions == "empty")
                if cfg.dedup_captions != "ignore" else {})
    if captions:
        report["kept_copies_with_merged_captions"] = len(captions)
    if anchors:
        # What each anchored caption is pulled towards, for the user to read (duplicates.json).
        report["anchored_captions"] = [{"caption": pick_caption(values[min(c)], "first", cfg.caption_column),
                                        "copies": len(c), "anchors": anchors[min(c)]}
                                       for c in clusters if min(c) in anchors]
        logger.info("%d duplicated captions train towards anchor captions (dedup_captions=anchor)", len(anchors),
                    main_process_only=True)
    return Split([[kept[j] for j in shard] for shard in local], report, captions, anchors)


def _captions_of(values: list, ids: list[int]) -> list[str]:
    """The distinct captions of rows `ids`, in order of first appearance (a list-valued row gives all of its own)."""
    return list(dict.fromkeys(caption for i in ids for caption in
                              (values[i] if isinstance(values[i], (list, tuple)) else [values[i]])))


def cluster_captions(values: list, clusters: list[list[int]], shared_empty: bool = False) -> dict[int, list[str]]:
    """For each cluster whose members hold more than one distinct caption: its kept id (the smallest, as
    keep_one keeps) -> those captions, in order of first appearance (a list-valued row gives all of its own).
    With `shared_empty`, a cluster whose copies share one caption -> [""]: the empty prompt."""
    merged = {}
    for cluster in clusters:
        captions = _captions_of(values, sorted(cluster))
        if len(captions) > 1:
            merged[min(cluster)] = captions
        elif shared_empty:
            merged[min(cluster)] = [""]
    return merged


def anchored_copies(values: list, clusters: list[list[int]], embed: Callable[[list[str]], Tensor], count: int
                    ) -> dict[int, list[str]]:
    """dedup_captions=anchor: the kept copy (smallest id) of each cluster whose copies share one non-empty caption
    -> the `count` captions of images outside every cluster whose conditioning (`embed`: the text encoder's
    output, what the denoiser sees) is nearest to that caption's, by cosine: what the copied caption should mean,
    from the captions the model treats most alike (Kumari et al. 2023 anchor a copied caption to paraphrases)."""
    shared = {min(c): caps[0] for c in clusters if len(caps := _captions_of(values, sorted(c))) == 1 and caps[0]}
    if not shared:
        return {}
    in_cluster = {i for cluster in clusters for i in cluster}
    copied = set(shared.values())
    candidates = [c for c in _captions_of(values, [i for i in range(len(values)) if i not in in_cluster])
                  if c and c not in copied]
    if not candidates:
        raise ValueError("dedup_captions=anchor takes anchor captions from images outside the duplicate clusters, "
                         "and none has a caption of its own; use dedup_captions=empty or merge")
    embeddings = embed(list(shared.values()) + candidates)
    _, nearest = nearest_neighbours(embeddings[:len(shared)], embeddings[len(shared):], min(count, len(candidates)),
                                    metric="cosine")
    return {i: [candidates[j] for j in row] for i, row in zip(shared, nearest.tolist())}
