"""Near-duplicate detectors, shared by training-time dedup and `memmit eval`'s clusters (--dedup_features).

A detector turns images into feature rows and measures how far apart two rows are, in its own units,
against a threshold whose default was measured (EFFICACY.md, "Near-duplicate detectors"):
- `pixels`: grey pixels at <= 32 px, lightly blurred, each image normalised to zero mean and unit RMS (blind
  to brightness and contrast), compared at their best alignment within +-1 px (blind to small shifts and
  re-crops); distance = RMS difference, in [0, 2].
- `phash`: the 64-bit DCT perceptual hash of `imagehash` (blind to resizing, re-encoding and gamma);
  distance = Hamming distance in bits, in [0, 64].
- a TorchScript file, transformers model directory or Hub id (e.g. SSCD, DINOv2, CLIP): embeddings;
  distance = 1 - cosine similarity, in [0, 2].
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .transform import ImageTransform, convert_mode
from .dedup import find_duplicate_clusters, merge_overlapping

BUILT_IN = ("pixels", "phash")
PIXELS_RESOLUTION = 32  # duplicates are found on small crops: cheap, and blind to resampling noise
MAX_SHIFT = 1
BLUR = (torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)[:, None] * torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
        / 16).view(1, 1, 3, 3)
HASH_BITS = 64
# Measured defaults (EFFICACY.md), one per use. Training drops what it merges, so it merges only what is
# surely one image (a false merge drops a distinct image: quality fell); the eval only stops counting a
# family's members as each other's neighbours, so it merges whole families of variants (missing one
# leaves it blind to their copies; a false merge makes the criterion slightly stricter).
DEFAULT_THRESHOLDS = {"dedup": {"pixels": 0.15, "phash": 4.0, "embedding": 0.05},
                      "eval": {"pixels": 0.3, "phash": 10.0, "embedding": 0.1}}
THRESHOLD_RANGES = {"pixels": (0.0, 2.0), "phash": (0.0, float(HASH_BITS)), "embedding": (0.0, 2.0)}
EMBED_BATCH = 64


@dataclass
class Detector:
    """How near duplicates are found: features of images, a paired distance, its threshold."""

    name: str  # "pixels", "phash", or the embedding model's path or Hub id
    kind: str  # "pixels", "phash" or "embedding"
    threshold: float
    search: str = "auto"  # exact or indexed candidate search (neighbours.resolve_search)
    search_metric = "l2"  # the nearest_neighbours metric that ranks candidates like `distance`
    # How features are stored on disk (data/feature_store.py): float32, as computed. fp16 moved pixel distances by up
    # to 2e-4 and flipped 1 of 34k candidate pairs of MNIST at each threshold: not exact enough to keep the clusters.
    storage_dtype = "float32"

    def feature_key(self) -> dict:
        """What this detector's features depend on (not its threshold): stored features are keyed by it."""
        raise NotImplementedError

    def features(self, images: Iterable[Image.Image]) -> Tensor:
        raise NotImplementedError

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Distances of paired feature rows [P, D], [P, D] -> [P] (float64)."""
        raise NotImplementedError

    def clusters(self, images: Iterable[Image.Image], family_size: int = 0,
                 family_threshold: Optional[float] = None) -> list[list[int]]:
        """Clusters within the threshold; with `family_size`, also every family of at least that many images
        within `family_threshold` (a looser one: many variants of one image are copies, where two
        look-alike distinct images are not many)."""
        return self.clusters_of(self.features(images), family_size, family_threshold)

    def clusters_of(self, feats: Tensor, family_size: int = 0, family_threshold: Optional[float] = None
                    ) -> list[list[int]]:
        """clusters() of features already computed (data/feature_store.py)."""
        clusters = find_duplicate_clusters(feats, self.threshold, self.distance, search_metric=self.search_metric,
                                           search=self.search)
        if not family_size:
            return clusters
        families = find_duplicate_clusters(feats, family_threshold, self.distance, search_metric=self.search_metric,
                                           search=self.search)
        return merge_overlapping(clusters + [f for f in families if len(f) >= family_size])

    def describe(self) -> dict:
        return {"features": self.name, "kind": self.kind, "threshold": self.threshold}


class PixelDetector(Detector):
    def __init__(self, threshold: float, resolution: int, channels: int):
        super().__init__("pixels", "pixels", threshold)
        self.side = min(resolution, PIXELS_RESOLUTION)
        self.transform = ImageTransform(self.side, channels, center_crop=True)

    def feature_key(self) -> dict:
        return {"kind": "pixels", "side": self.side, "channels": self.transform.channels, "blur": BLUR.flatten().tolist()}

    def features(self, images: Iterable[Image.Image]) -> Tensor:
        x = torch.stack([self.transform(img).mean(0, keepdim=True) for img in images]).double()
        # A 3x3 binomial blur: JPEG and pixel noise, and sub-pixel moves, matter less.
        x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), BLUR).flatten(1)
        x = x - x.mean(1, keepdim=True)
        # A flat image (no contrast) stays all zeros rather than dividing by zero.
        return (x / x.square().mean(1, keepdim=True).sqrt().clamp(min=1e-6)).float()

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """RMS difference at the best of the (2 MAX_SHIFT + 1)^2 alignments, over the overlapping pixels."""
        s = self.side
        a, b = a.double().view(-1, s, s), b.double().view(-1, s, s)
        best = None
        for dy in range(-MAX_SHIFT, MAX_SHIFT + 1):
            for dx in range(-MAX_SHIFT, MAX_SHIFT + 1):
                pa = a[:, max(dy, 0):s + min(dy, 0), max(dx, 0):s + min(dx, 0)]
                pb = b[:, max(-dy, 0):s + min(-dy, 0), max(-dx, 0):s + min(-dx, 0)]
                d = (pa - pb).square().flatten(1).mean(1).sqrt()
                best = d if best is None else torch.minimum(best, d)
        return best


class PHashDetector(Detector):
    storage_dtype = "int8"  # the hash's bits as +-1: exact

    def __init__(self, threshold: float):
        super().__init__("phash", "phash", threshold)

    def feature_key(self) -> dict:
        return {"kind": "phash", "bits": HASH_BITS}

    def features(self, images: Iterable[Image.Image]) -> Tensor:
        # imagehash (a well-kept library) rather than a hand-written DCT hash; rows are the bits as +-1,
        # so squared L2 = 4 x Hamming and the L2 search ranks candidates exactly as the Hamming distance.
        import imagehash

        bits = [imagehash.phash(convert_mode(img, 1)).hash.flatten() for img in images]
        return torch.from_numpy(np.stack(bits).astype(np.float32) * 2 - 1)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return (a != b).sum(1).double()


class EmbeddingDetector(Detector):
    search_metric = "cosine"

    def __init__(self, path: str, threshold: float, resolution: int, channels: int, device: torch.device):
        from .features import load_extractor

        super().__init__(path, "embedding", threshold)
        self.transform = ImageTransform(resolution, channels, center_crop=True)
        probe = torch.rand(2, channels, resolution, resolution)
        self.extractor = load_extractor(path, device, probe, "dedup_features")

    def feature_key(self) -> dict:
        return {"kind": "embedding", "model": self.name, "weights": self.extractor.weights,
                "resolution": self.transform.resolution, "channels": self.transform.channels}

    def features(self, images: Iterable[Image.Image]) -> Tensor:
        x = torch.stack([(self.transform(img) + 1) / 2 for img in images])
        return self.extractor(x, EMBED_BATCH)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return 1 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def detector_kind(features: str) -> str:
    return features if features in BUILT_IN else "embedding"


def check_detector_options(features: str, threshold: Optional[float]) -> None:
    """The option checks that need no model: a threshold inside its detector's range (load_detector's first step,
    before any data is read)."""
    if threshold is None:
        return
    low, high = THRESHOLD_RANGES[detector_kind(features)]
    if not low <= threshold <= high:
        raise ValueError(f"dedup_threshold {threshold} is outside [{low:g}, {high:g}], the range of "
                         f"dedup_features={features!r} distances")


def threshold_for(features: str, threshold: Optional[float], use: str) -> float:
    """--dedup_threshold, else the measured default of `features` for `use` ("dedup" or "eval")."""
    return DEFAULT_THRESHOLDS[use][detector_kind(features)] if threshold is None else float(threshold)


def load_detector(features: str, threshold: Optional[float], resolution: int, channels: int,
                  device: Optional[torch.device] = None, use: str = "dedup", search: str = "auto") -> Detector:
    """The detector `--dedup_features` names, with `--dedup_threshold` or its measured default for `use`
    ("dedup": training; "eval": memmit eval's families); a model that does not load, or fails on images of
    this size, is a ValueError naming the option. `search`: how it searches candidates (--dedup_search)."""
    check_detector_options(features, threshold)
    kind = detector_kind(features)
    threshold = threshold_for(features, threshold, use)
    if kind == "pixels":
        detector = PixelDetector(threshold, resolution, channels)
    elif kind == "phash":
        detector = PHashDetector(threshold)
    else:
        detector = EmbeddingDetector(features, threshold, resolution, channels, device or torch.device("cpu"))
    detector.search = search
    return detector
