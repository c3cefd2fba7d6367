"""Features of every image of a training set, on disk: a near-duplicate detector's (training-time dedup and the eval's
families) and the eval's training pixels.

The rows are cut into chunks of CHUNK_ROWS; the main machine's processes compute every P-th chunk each, and each chunk
is written whole as soon as it is done (a temporary file renamed into place), so a killed run resumes at the chunks it
had not finished and no process holds more than one chunk of images. The chunks are stored in the featurizer's
`storage_dtype`. A featurizer is a detector (data/detectors.py) or anything else with
`feature_key()` (what its features depend on), `features(images)` ([N, D] float32) and `storage_dtype`. The folder's
manifest holds the fingerprint of the data (each image's stored bytes, data/content.py) and of the featurizer (its
kind, input size and weights; not a detector's threshold): a folder holding the features of another dataset or
detector is refused, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache import remove_partial_writes, write_whole, writable_cache
from ..workers import Workers
from .content import content_key, sample_digests
from .dataset import iter_images

CHUNK_ROWS = 4096  # images decoded and held at once by one process; one file each
FORMAT = 1


# Each dataset's images key, by its `datasets` fingerprint (which changes with any change to its rows) and column: an
# evaluation stores several featurizers of one dataset, and hashing a million images' bytes once is enough.
_IMAGES_KEYS: dict[tuple[str, str], str] = {}


def images_key(ds: datasets.Dataset, image_column: str, show_progress: bool = True) -> str:
    """One digest of every image's stored bytes, in row order."""
    memo = (ds._fingerprint, image_column)
    if memo not in _IMAGES_KEYS:
        _IMAGES_KEYS[memo] = content_key(sample_digests(ds, image_column, None, show_progress))
    return _IMAGES_KEYS[memo]


def fingerprint_of(featurizer, ds: datasets.Dataset, image_column: str, show_progress: bool = True) -> dict:
    """What the features depend on: the featurizer's settings and every image's stored bytes, in row order."""
    return {"format": FORMAT, "detector": featurizer.feature_key(), "rows": len(ds),
            "images": images_key(ds, image_column, show_progress), "dtype": featurizer.storage_dtype,
            "chunk_rows": CHUNK_ROWS}


class FeatureStore:
    """The chunk files of one fingerprint in one folder."""

    def __init__(self, directory: Path, fingerprint: dict):
        self.directory, self.fingerprint = Path(directory), fingerprint
        self.rows, self.chunk_rows = fingerprint["rows"], fingerprint["chunk_rows"]
        self.chunks = -(-self.rows // self.chunk_rows)
        self.manifest = self.directory / "manifest.json"

    def chunk(self, c: int) -> Path:
        return self.directory / f"chunk-{c:06d}.npy"

    def missing(self) -> list[int]:
        return [c for c in range(self.chunks) if not self.chunk(c).is_file()]

    def check(self) -> None:
        """Refuse a folder whose manifest names other data or another detector, naming what differs."""
        if not self.manifest.is_file():
            if any(self.directory.glob("chunk-*.npy")):
                raise ValueError(f"{self.directory} holds feature chunks and no manifest.json: whose they are is "
                                 f"unknown, so they are not reused; remove them")
            return
        try:
            saved = json.loads(self.manifest.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.manifest} cannot be read ({exc}); remove the folder {self.directory}") from exc
        what = {"images": "another dataset's images", "rows": "another number of images",
                "detector": "another detector's features", "dtype": "another storage dtype",
                "chunk_rows": "chunks of another size", "format": "another memmit's format"}
        differs = [key for key in what if saved.get(key) != self.fingerprint[key]]
        if differs:
            raise ValueError(f"{self.directory} holds {', '.join(what[key] for key in differs)} (its manifest.json "
                             f"differs in {differs}): it is not reused; remove it, or set dedup_features_dir to "
                             f"another folder")

    def open(self) -> None:
        """The manifest written and a killed run's temporary files removed (one process, before any other writes)."""
        remove_partial_writes(self.directory)
        if not self.manifest.is_file():
            self._write(self.manifest, json.dumps(self.fingerprint, indent=1).encode())

    def _write(self, path: Path, data: bytes) -> None:
        write_whole(path, data, lambda: f"{self.chunks - len(self.missing())} of {self.chunks} chunks are written "
                                        "and a rerun reuses them; free space or set dedup_features_dir to a folder "
                                        "on another disk")

    def compute(self, featurizer, ds: datasets.Dataset, image_column: str, workers: Workers,
                show_progress: bool = True) -> None:
        """This process's missing chunks (every `workers.count`-th), each written as soon as it is computed."""
        mine = workers.mine(self.missing())
        rows = sum(min(self.chunk_rows, self.rows - c * self.chunk_rows) for c in mine)
        desc = f"{featurizer.feature_key()['kind']} features"
        desc += f" (process {workers.index} of {workers.count})" if workers.count > 1 else ""
        with tqdm(total=rows, desc=desc, disable=not show_progress, leave=False) as bar:
            for c in mine:
                span = range(c * self.chunk_rows, min(self.rows, (c + 1) * self.chunk_rows))
                feats = featurizer.features(iter_images(ds, image_column, show_progress=False, rows=span))
                buffer = io.BytesIO()
                np.save(buffer, feats.numpy().astype(featurizer.storage_dtype))
                self._write(self.chunk(c), buffer.getvalue())
                bar.update(len(span))

    def read(self) -> torch.Tensor:
        """All rows as one float32 tensor, read a chunk at a time (memory: the rows and one chunk; a memory map would
        also count every chunk's pages); a chunk of the wrong shape or dtype is refused by name."""
        out = None
        for c in range(self.chunks):
            part = np.load(self.chunk(c))
            start = c * self.chunk_rows
            expected = (min(self.chunk_rows, self.rows - start), part.shape[-1] if out is None else out.shape[1])
            if part.shape != expected or str(part.dtype) != self.fingerprint["dtype"]:
                raise ValueError(f"{self.chunk(c)} holds {part.dtype} rows of shape {part.shape}, not this store's "
                                 f"{expected[0]} rows of {self.fingerprint['dtype']}; remove it and rerun")
            if out is None:
                out = np.empty((self.rows, part.shape[1]), dtype=np.float32)
            out[start:start + part.shape[0]] = part
        return torch.from_numpy(out)


def store_for(featurizer, ds: datasets.Dataset, image_column: str, directory: Optional[str],
              show_progress: bool = True) -> FeatureStore:
    """The store of this featurizer and data: in `directory` (--dedup_features_dir), else under memmit's cache, keyed by
    the fingerprint."""
    fingerprint = fingerprint_of(featurizer, ds, image_column, show_progress)
    if directory is None:
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:32]
        directory = writable_cache("features") / key
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"dedup_features_dir {str(directory)!r} cannot be created ({exc.strerror or exc})") from exc
    store = FeatureStore(Path(directory), fingerprint)
    store.check()
    return store


def stored_features(featurizer, ds: datasets.Dataset, image_column: str, workers: Workers = Workers(),
                    directory: Optional[str] = None, show_progress: bool = True) -> Optional[torch.Tensor]:
    """The featurizer's features of every image, computed by `workers` (or found on disk); every process calls it,
    and the main process (index 0) gets them (the others None)."""
    store = store_for(featurizer, ds, image_column, directory, show_progress) if workers.index is not None else None
    if workers.index == 0:
        store.open()
    workers.barrier()
    if store is not None:
        store.compute(featurizer, ds, image_column, workers, show_progress and workers.index == 0)
    workers.barrier()
    return store.read() if workers.index == 0 else None
