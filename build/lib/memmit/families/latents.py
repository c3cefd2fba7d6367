"""--cache_latents: the VAE's latent distribution of every training image (and of its mirror image, with
--random_flip) and its original size, and the text encoders' output (hidden states, and the pooled embedding of
SDXL, SD3 and Flux) for every training caption and the empty prompt, computed once, batched on the accelerator,
and kept under cache_root()/latents/<key>/ for later runs.

The key is a hash of what the values depend on: the VAE's and text encoders' weights and configs, the
tokenizers and their prompt lengths, the data's content (data/content.py: each image's bytes and caption, not
its file's name or mtime), the image and caption columns, resolution, crop,
flip and the dtype the frozen parts run in.
A latent is still sampled at every step (mean + std x noise, the noise from the sample's own generator) and the
flip coin and the prompt are drawn as without the cache, so a run with the cache draws what one without it draws.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..cache import cache_root, hash_tensor, writable_cache
from ..data.content import content_key
from ..data.dataset import iter_images, pick_caption
from ..data.transform import ImageTransform
from .inputs import CaptionedImageInputs, MicroConditionedInputs
from .stable_diffusion import TextToImageTask

CACHE_BATCH = 32  # images per VAE call while caching


def check_cache_latents(task) -> None:
    """Refuse what the cache cannot serve, before any data is loaded (config.py refuses a random crop)."""
    if not isinstance(task, TextToImageTask):
        raise ValueError(f"--cache_latents caches the VAE latents and text-encoder outputs of text-to-image pipelines; "
                         f"{type(task.pipeline).__name__} trains on pixels (nothing to cache)")
    writable_cache("latents")


def training_prompts(captions: Sequence, column: str) -> list[str]:
    """Every prompt a step can draw without caption rules: each caption (every one of a list) and the empty one."""
    return list(dict.fromkeys([""] + [pick_caption(c, "first", column) for value in captions
                                      for c in (value if isinstance(value, (list, tuple)) else [value])]))


def cache_key(task: TextToImageTask, content: list[str], image_column: str, caption_column: str,
              random_flip: bool) -> str:
    h = hashlib.sha256()
    for name, module in [("vae", task.vae), *zip(task.text.names, task.text.encoders)]:
        for key, t in module.state_dict().items():
            hash_tensor(h, f"{name}.{key}", t)
        h.update(json.dumps({k: v for k, v in module.config.items() if not k.startswith("_")} if isinstance(
            module.config, dict) else module.config.to_dict(), sort_keys=True, default=str).encode())
    for tokenizer in task.text.tokenizers:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps({"content": content_key(content), "image_column": image_column,
                         "caption_column": caption_column, "resolution": task.resolution, "center_crop": True,
                         "random_flip": random_flip, "dtype": str(task.weight_dtype),
                         "token_lengths": list(task.text.lengths()), "format": 3},
                        sort_keys=True).encode())
    return h.hexdigest()


@torch.no_grad()
def build_cache(directory: Path, task: TextToImageTask, dataset: datasets.Dataset, image_column: str,
                caption_column: str, random_flip: bool, device: torch.device, show_progress: bool = True) -> None:
    """Encode every image (center crop; and mirrored) and every training prompt; written whole or not at all.
    The frozen parts run under autocast as in a training step, so the values are the ones a step would compute."""
    transform = ImageTransform(task.resolution, task.channels, center_crop=True)
    autocast = torch.autocast(device.type, dtype=task.weight_dtype, enabled=task.weight_dtype != torch.float32)
    latents: dict[str, list[torch.Tensor]] = {name: [] for name in ("mean", "std", "mean_flipped", "std_flipped")}

    def encode(pixels: list[torch.Tensor]) -> None:
        x = torch.stack(pixels).to(device, task.weight_dtype)
        for suffix, images in [("", x)] + ([("_flipped", x.flip(-1))] if random_flip else []):
            with autocast:
                dist = task.encode_pixels(images, device)
            latents["mean" + suffix].append(dist.mean.cpu())
            latents["std" + suffix].append(dist.std.cpu())

    pending: list[torch.Tensor] = []
    sizes = []  # (width, height) before the transform: SDXL's micro-conditioning
    for img in iter_images(dataset, image_column, "caching latents", show_progress):
        sizes.append(img.size)
        pending.append(transform(img))
        if len(pending) == CACHE_BATCH:
            encode(pending)
            pending = []
    if pending:
        encode(pending)
    prompts = training_prompts(dataset[caption_column], caption_column)
    text, pooled = task.text.encode_prompts(prompts, device, "caching text embeddings" if show_progress else None)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
    save_file({**{name: torch.cat(parts).contiguous() for name, parts in latents.items() if parts},
               "sizes": torch.tensor(sizes)}, str(tmp / "latents.safetensors"))
    save_file({"text": text.contiguous(), **({"pooled": pooled.contiguous()} if pooled is not None else {})},
              str(tmp / "text.safetensors"))
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    try:
        os.replace(tmp, directory)
    except OSError:  # another machine sharing the cache folder wrote the same key first: keep its files
        shutil.rmtree(tmp)


def cached_inputs(task: TextToImageTask, dataset: datasets.Dataset, content: list[str], image_column: str,
                  caption_column: str, random_flip: bool, device: torch.device,
                  show_progress: bool = True) -> "CachedInputs":
    """The cache for this run's settings and data (`content`: its samples' digests), built if no earlier run left
    it; inputs that read it."""
    directory = cache_root() / "latents" / cache_key(task, content, image_column, caption_column, random_flip)
    if (directory / "prompts.json").is_file():
        said = f"reusing the cached latents and text embeddings in {directory}"
    else:
        build_cache(directory, task, dataset, image_column, caption_column, random_flip, device, show_progress)
        said = f"latents and text embeddings cached in {directory}"
    if show_progress:
        print(f"memmit: {said}")
    return CachedInputs(str(directory), random_flip, task.inputs)


class CachedInputs:
    """Dataset rows -> model inputs from the cache: each sample's latent mean and std (mirrored when its flip coin
    says so), its prompt's text embedding (and pooled embedding) and, for SDXL, its time_ids from its original size;
    a prompt the caption rules made up is tokenized, for the text encoders to encode in the step. Draws what
    CaptionedImageInputs draws (a center crop draws nothing)."""

    def __init__(self, directory: str, random_flip: bool, prompts: CaptionedImageInputs):
        self.directory, self.random_flip, self.prompts = directory, random_flip, prompts
        self.index = {p: i for i, p in enumerate(json.loads((Path(directory) / "prompts.json").read_text()))}
        self.columns = (prompts.caption_column,)  # no image is decoded
        self._files: Optional[dict] = None  # opened in the process that reads (a data-loading worker)

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _files=None)

    def _file(self, name: str):
        if self._files is None:
            self._files = {n: safe_open(str(Path(self.directory) / f"{n}.safetensors"), "pt") for n in ("latents",
                                                                                                     "text")}
        return self._files[name]

    def _rows(self, file: str, tensor: str, rows: Sequence[int]) -> torch.Tensor:
        part = self._file(file).get_slice(tensor)
        return torch.cat([part[i:i + 1] for i in rows])

    def __call__(self, rows: dict, generators: Sequence[torch.Generator], ids: Sequence[int]) -> dict:
        flips = [self.random_flip and bool(torch.rand((), generator=g) < 0.5) for g in generators]
        prompts, text_inputs = self.prompts.text_inputs(rows, generators)
        suffixes = ["_flipped" if flip else "" for flip in flips]
        mean = torch.cat([self._rows("latents", "mean" + s, [i]) for s, i in zip(suffixes, ids)])
        std = torch.cat([self._rows("latents", "std" + s, [i]) for s, i in zip(suffixes, ids)])
        found = [self.index.get(p) for p in prompts]
        rows_found = [0 if i is None else i for i in found]  # row 0 stands in, unused
        # Anchor captions (dedup_captions=anchor) are encoded in the step, from their tokens.
        out = {**text_inputs, "latent_mean": mean, "latent_std": std, "text": self._rows("text", "text", rows_found),
               "encode": torch.tensor([i is None for i in found])}
        if "pooled" in self._file("text").keys():
            out["pooled"] = self._rows("text", "pooled", rows_found)
        if isinstance(self.prompts, MicroConditionedInputs):
            sizes = self._rows("latents", "sizes", ids).tolist()
            out["time_ids"] = self.prompts.time_ids([self.prompts.transform.center_crop_geometry(w, h, flip)
                                                     for (w, h), flip in zip(sizes, flips)])
        return out
