"""Image embeddings for the eval's feature metrics, its quality metric and the embedding dedup detector:
a TorchScript file, or a transformers image model given as a directory or a Hub id."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..cache import hash_module


@dataclass
class Extractor:
    """An image embedding: [N, C, H, W] in [0, 1] -> [N, D], and how the report names it."""

    info: dict
    embed: Callable[[Tensor], Tensor]
    weights: str = ""  # a digest of the model's weights: stored features are keyed by it (data/feature_store.py)

    @torch.no_grad()
    def __call__(self, images01: Tensor, batch_size: int) -> Tensor:
        return torch.cat([self.embed(images01[i:i + batch_size]).flatten(1).float().cpu()
                          for i in range(0, images01.shape[0], batch_size)])


def _torchscript_extractor(path: str, device: torch.device) -> Extractor:
    try:
        module = torch.jit.load(path, map_location=device).eval()
    except RuntimeError as exc:
        raise ValueError(f"cannot load {path!r} as a TorchScript module: {exc}") from exc
    return Extractor({"kind": "torchscript", "path": path}, lambda x: module(x.to(device)), _weights_digest(module))


def _transformers_extractor(path: str, device: torch.device) -> Extractor:
    from transformers import AutoImageProcessor, AutoModel

    try:
        processor = AutoImageProcessor.from_pretrained(path)
        model = AutoModel.from_pretrained(path).to(device).eval()
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load {path!r} as a transformers image model: {exc}") from exc
    wants = getattr(model.config, "num_channels", 3)

    def embed(x: Tensor) -> Tensor:
        if x.shape[1] == 1 and wants == 3:  # grey training sets on RGB encoders
            x = x.repeat(1, 3, 1, 1)
        inputs = processor(images=list(x.numpy()), do_rescale=False, input_data_format="channels_first",
                           return_tensors="pt").to(device)
        # CLIP-like models embed images with get_image_features; plain encoders pool their output.
        out = model.get_image_features(**inputs) if hasattr(model, "get_image_features") else model(**inputs)
        if isinstance(out, Tensor):
            return out
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state.mean(1)

    return Extractor({"kind": "transformers", "path": path, "class": type(model).__name__}, embed,
                     _weights_digest(model))


def _weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    hash_module(h, "model", module)
    return h.hexdigest()


def load_extractor(path: str, device: torch.device, probe: Tensor, role: str) -> Extractor:
    """A TorchScript file or a transformers model directory, tried on `probe` so it fails before sampling."""
    try:
        if Path(path).is_file():
            extractor = _torchscript_extractor(path, device)
        elif Path(path).is_dir() or _looks_like_hub_id(path):
            extractor = _transformers_extractor(path, device)
        else:
            raise ValueError(f"{path!r} does not exist")
    except ValueError as exc:
        raise ValueError(f"{role}: {exc}") from exc
    try:
        feats = extractor(probe, probe.shape[0])
    except Exception as exc:  # a foreign module can raise anything on unexpected input
        raise ValueError(f"{role} {path!r} failed on images of shape {tuple(probe.shape)}: {exc}") from exc
    if feats.shape[0] != probe.shape[0] or feats.shape[1] == 0:
        raise ValueError(f"{role} {path!r} returned shape {tuple(feats.shape)} for {probe.shape[0]} images")
    return extractor


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))
