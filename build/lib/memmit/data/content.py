"""What the training set holds, by content: one digest per sample of its image as stored (the file's bytes, not
its name or modification time) and of its caption, computed once per run. The latent cache is keyed by them and
a resume checks them, so an image replaced in place (`cp -p`, `rsync -a` and `tar x` keep its mtime) is never
taken for the one it replaced."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import datasets
from tqdm.auto import tqdm

DIGEST_CHARS = 32  # 128 bits of sha256 per sample: no collision among billions of images
BATCH = 256  # rows read at a time


def _image_bytes(value: Optional[dict]) -> bytes:
    """An undecoded image: the bytes `datasets` stores, else the file it points to."""
    if value is None:
        return b""
    if value.get("bytes") is not None:
        return value["bytes"]
    return Path(value["path"]).read_bytes()


def sample_digests(ds: datasets.Dataset, image_column: str, caption_column: Optional[str] = None,
                   show_progress: bool = True) -> list[str]:
    """Row i's digest of its image's stored bytes and its caption value (None: no caption column)."""
    columns = [image_column] + ([caption_column] if caption_column else [])
    raw = ds.select_columns(columns).cast_column(image_column, datasets.Image(decode=False))
    digests = []
    with tqdm(total=len(ds), desc="hashing the data", disable=not show_progress, leave=False) as bar:
        for batch in raw.iter(batch_size=BATCH):
            captions = batch[caption_column] if caption_column else [None] * len(batch[image_column])
            for image, caption in zip(batch[image_column], captions):
                h = hashlib.sha256(_image_bytes(image))
                h.update(json.dumps(caption).encode())
                digests.append(h.hexdigest()[:DIGEST_CHARS])
            bar.update(len(batch[image_column]))
    return digests


def content_key(digests: Sequence[str]) -> str:
    """One digest of the whole training set, in row order."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def first_difference(saved: Sequence[str], now: Sequence[str], sources: Sequence[str]) -> Optional[str]:
    """None when both digest lists match, else what changed first, naming the sample's file."""
    for i, (a, b) in enumerate(zip(saved, now)):
        if a != b:
            return f"sample {i} ({sources[i]}) changed"
    if len(now) > len(saved):
        return f"sample {len(saved)} ({sources[len(saved)]}) was added ({len(now)} samples now, {len(saved)} then)"
    if len(now) < len(saved):
        return f"{len(saved) - len(now)} sample(s) from id {len(now)} on were removed ({len(now)} samples now)"
    return None
