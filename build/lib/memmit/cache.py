"""Where memmit keeps what it computes once and reuses (the "before" evaluation, cached latents), and the hash
that keys it: of weights, not of where they were loaded from."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def cache_root() -> Path:
    """$MEMMIT_CACHE, else $XDG_CACHE_HOME/memmit, else ~/.cache/memmit."""
    if os.environ.get("MEMMIT_CACHE"):
        return Path(os.environ["MEMMIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memmit"


def writable_cache(name: str) -> Path:
    """cache_root()/name, created and checked to be writable: a run that caches there fails before its work, not
    after it, naming the folder and the variable that moves it."""
    path = cache_root() / name
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"memmit's cache folder {str(path)!r} cannot be written ({exc.strerror or exc}); set "
                         "MEMMIT_CACHE to a folder that can") from exc
    return path


def hash_tensor(h, name: str, t: torch.Tensor) -> None:
    """Feed a tensor's name, dtype, shape and bytes into a hashlib hash."""
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # as uint8: numpy has no bfloat16
