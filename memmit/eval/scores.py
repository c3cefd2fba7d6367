"""Scoring samples against the training set: memorization in pixels (d1/d2 with one neighbour per near-duplicate
family, the neighbourhood score), optionally in an embedding's cosine, and quality (Fréchet distance to one image
per family). Pure functions of tensors: saved samples can be scored again."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..data.features import Extractor
from .metrics import (cluster_labels, cluster_memorization_report, default_device, exact_clusters, first_occurrence,
                      frechet_distance, memorization_report)

MOST_COPIED = 10  # training images listed in the report
MEMBERS_LISTED = 8  # members of a most-copied cluster named in the report


def _most_copied(copied_counts: dict[int, int], sources: list[str]) -> list[dict]:
    return [{"index": i, "source": sources[i], "count": c} for i, c in list(copied_counts.items())[:MOST_COPIED]]


def _most_copied_clusters(per_sample: dict, clusters: list[list[int]], sources: list[str]) -> list[dict]:
    """Near-duplicate families (and lone images) by how many samples copy one of their members."""
    counts: dict[int, int] = {}
    for c, copied in zip(per_sample["cluster"].tolist(), per_sample["memorized"].tolist()):
        if copied:
            counts[c] = counts.get(c, 0) + 1
    labels = cluster_labels(len(sources), clusters).tolist()
    rows = []
    for c, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:MOST_COPIED]:
        members = clusters[c] if c < len(clusters) else [labels.index(c)]
        rows.append({"count": n, "size": len(members), "members": [sources[i] for i in members[:MEMBERS_LISTED]],
                     "ids": list(members[:MEMBERS_LISTED])})
    return rows


def _pixel_report(samples: Tensor, train: Tensor, sources: list[str], k: int, threshold: float,
                  clusters: list[list[int]], detector: dict) -> dict:
    """d1/d2 and neighbourhood criteria in pixels, one neighbour per near-duplicate cluster; the byte-identical
    figures (only exact copies merged) beside them."""
    rep = cluster_memorization_report(samples.flatten(1), train.flatten(1), clusters, k=k, threshold=threshold)
    exact = memorization_report(samples.flatten(1), train.flatten(1), k=k, threshold=threshold)["summary"]
    summary = dict(rep["summary"])
    summary["fraction_memorized_by_score"] = {f"{t:g}": v for t, v in summary["fraction_memorized_by_score"].items()}
    summary["num_distinct_train"] = exact["num_distinct_train"]
    summary["clusters"] = {"detector": detector, "num_clusters": len(clusters),
                           "num_samples_in_clusters": sum(len(c) for c in clusters),
                           "largest": max((len(c) for c in clusters), default=1), "groups": clusters}
    summary["byte_identical"] = {
        "fraction_memorized_ratio": exact["fraction_memorized_ratio"],
        "fraction_memorized_by_score": {f"{t:g}": v for t, v in exact["fraction_memorized_by_score"].items()}}
    summary["most_copied"] = _most_copied(summary.pop("copied_counts"), sources)
    summary["most_copied_clusters"] = _most_copied_clusters(rep["per_sample"], clusters, sources)
    summary["per_sample"] = {name: v.tolist() for name, v in rep["per_sample"].items()}
    return summary


def _feature_report(samples01: Tensor, train: Tensor, sources: list[str], extractor: Extractor,
                    batch_size: int) -> dict:
    """Memorization in the extractor's cosine; `train`: the training set's embeddings."""
    rep = memorization_report(extractor(samples01, batch_size), train, metric="cosine")
    summary = {"extractor": extractor.info, **rep["summary"]}
    summary["most_copied"] = _most_copied(summary.pop("copied_counts"), sources)
    summary["per_sample"] = {name: v.tolist() for name, v in rep["per_sample"].items()}
    return summary


def _inception_fid(samples01: Tensor, train01: Tensor, batch_size: int) -> dict:
    """torchmetrics' FID when torch-fidelity and its Inception weights load (offline they may not)."""
    info = {"kind": "inception-v3", "via": "torchmetrics FrechetInceptionDistance"}
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        # Inception at 299x299 over a whole training set is hours on a CPU, minutes on a GPU.
        fid = FrechetInceptionDistance(feature=2048, normalize=True).to(default_device())
    except (ImportError, OSError, RuntimeError) as exc:  # missing package, or weights not downloadable
        return {"available": False, "extractor": info, "reason": f"{type(exc).__name__}: {exc}"}
    for images, real in ((samples01, False), (train01, True)):
        for i in range(0, images.shape[0], batch_size):
            batch = images[i:i + batch_size]
            batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch[:, :3]
            fid.update(batch.to(fid.device), real=real)
    return {"available": True, "extractor": info, "frechet_distance": fid.compute().item()}


def frechet_report(samples01: Tensor, reference01: Tensor, extractor: Optional[Extractor], batch_size: int,
                   reference_embedded: Optional[Tensor] = None) -> dict:
    """Fréchet distance of samples to reference images in [0, 1]: in the extractor's embedding (the reference's
    given as `reference_embedded` when stored), else torchmetrics' Inception FID when it loads."""
    if extractor is None:
        return _inception_fid(samples01, reference01, batch_size)
    reference = extractor(reference01, batch_size) if reference_embedded is None else reference_embedded
    return {"available": True, "extractor": extractor.info,
            "frechet_distance": frechet_distance(extractor(samples01, batch_size), reference)}


def _quality_report(samples01: Tensor, train01: Tensor, clusters: list[list[int]], extractor: Optional[Extractor],
                    train_embedded: Optional[Tensor], batch_size: int) -> dict:
    """Fréchet distance to one training image per near-duplicate family: against the raw set, a model that
    copies duplicated images would be rewarded for matching their inflated frequency. `train_embedded`: the
    training set's embeddings by `extractor`."""
    labels = cluster_labels(train01.shape[0], clusters)
    reference = first_occurrence(labels, int(labels.max()) + 1)
    report = frechet_report(samples01, train01[reference], extractor, batch_size,
                            None if train_embedded is None else train_embedded[reference])
    return {**report, "reference": f"one of each of {len(reference)} near-duplicate families and lone images, "
                                   f"of {len(train01)} training images"}


def score_samples(samples: Tensor, train: Tensor, sources: list[str], *, clusters: Optional[list[list[int]]] = None,
                  detector: Optional[dict] = None, k: int = 50, threshold: float = 1 / 3,
                  feature_extractor: Optional[Extractor] = None, quality_extractor: Optional[Extractor] = None,
                  train_embeddings: Optional[dict[str, Tensor]] = None, batch_size: int = 64) -> dict:
    """The memorization and quality report of `samples` against `train`, both [N, C, H, W] in [-1, 1].

    `clusters` (near-duplicate families of training ids, found by `detector`) count once as neighbours.
    `train_embeddings` (role -> [N, D]): the extractors' embeddings of `train` when already computed (memmit
    eval's come from the feature store); an extractor without one embeds `train` here.
    Keys: "pixel" (L2 ratio and neighbourhood criteria), "features" (cosine in the feature
    extractor's space, or None), "quality" (Fréchet distance, or why it is unavailable).
    """
    if clusters is None:  # without a detector's clusters, byte-identical training images are one
        clusters, detector = exact_clusters(train.flatten(1)), {"features": "byte-identical", "threshold": 0.0}
    samples01, train01 = (samples + 1) / 2, (train + 1) / 2
    embedded = dict(train_embeddings or {})
    for role, extractor in (("feature_extractor", feature_extractor), ("quality_extractor", quality_extractor)):
        if extractor is not None and role not in embedded:
            embedded[role] = extractor(train01, batch_size)
    features = (None if feature_extractor is None
                else _feature_report(samples01, embedded["feature_extractor"], sources, feature_extractor, batch_size))
    return {"pixel": _pixel_report(samples, train, sources, k, threshold, clusters, detector),
            "features": features,
            "quality": _quality_report(samples01, train01, clusters, quality_extractor,
                                       embedded.get("quality_extractor"), batch_size)}
