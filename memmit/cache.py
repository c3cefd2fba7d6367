"""Where memmit keeps what it computes once and reuses (the "before" evaluation, cached latents), and the hash
that keys it: of weights, not of where they were loaded from."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

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


NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a full disk, a file-size limit, a quota


def write_whole(path: Path, data: bytes, advice: Callable[[], str]) -> None:
    """`path` written whole or not at all (a temporary file renamed into place: a kill leaves no half-written file
    under its name, only a `.*.tmp` one); a disk that fills is a ValueError naming the folder, then `advice()`."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)  # one call: numpy's and safetensors' own file writing can drop the errno of a full disk
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in NO_ROOM:
            raise ValueError(f"no room to write {path.name} in {path.parent} ({exc.strerror}): {advice()}") from exc
        raise


def remove_partial_writes(folder: Path) -> None:
    """The temporary files a killed write_whole left in `folder`."""
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def hash_module(h, prefix: str, module: torch.nn.Module) -> None:
    """Feed every tensor of a module's state dict into a hashlib hash, each named `prefix.key`."""
    for key, t in module.state_dict().items():
        hash_tensor(h, f"{prefix}.{key}", t)


def hash_tensor(h, name: str, t: torch.Tensor) -> None:
    """Feed a tensor's name, dtype, shape and bytes into a hashlib hash."""
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # as uint8: numpy has no bfloat16
