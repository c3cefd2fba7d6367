"""--cache_latents: the VAE's latent distribution of every training image (and of its mirror image, with
--random_flip) and its original size, and the text encoders' output (hidden states, and the pooled embedding of
SDXL, SD3 and Flux) for every training caption and the empty prompt, computed once, batched on the accelerator,
and kept under cache_root()/latents/<key>/ for later runs.

The cache is built by every process of a machine, each its share of chunks of CHUNK_ROWS images (or prompts), each
chunk written to disk as soon as it is done: no process holds more than one chunk, a killed build resumes at the
chunks it had not written, and no process waits for another's whole dataset (a barrier held that long can outlast
NCCL's timeout). The text encoders' outputs are cached only while they fit --cache_text_limit_gb: T5's take 2.7-4.2 MB
a caption, and they are not cut to the prompt's tokens nor narrowed to fp16, because the denoiser attends to the
padding tokens' outputs too and reads what a step would compute: a cut or narrowed cache would train another model.

The key is a hash of what the values depend on: the VAE's and text encoders' weights and configs, the
tokenizers and their prompt lengths, the data's content (data/content.py: each image's bytes and caption, not
its file's name or mtime), the image and caption columns, resolution, crop,
flip, the dtype the frozen parts run in and whether the text is cached.
A latent is still sampled at every step (mean + std x noise, the noise from the sample's own generator) and the
flip coin and the prompt are drawn as without the cache, so a run with the cache draws what one without it draws.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from ..cache import cache_root, hash_module, remove_partial_writes, write_whole, writable_cache
from ..data.content import content_key
from ..data.dataset import iter_images, pick_caption
from ..data.transform import ImageTransform
from ..workers import Workers
from .inputs import CaptionedImageInputs, MicroConditionedInputs
from .stable_diffusion import TextToImageTask

CACHE_BATCH = 32  # images per VAE call while caching
# Images (or prompts) per file: what one process holds while building (SDXL's latents at 1024 px: ~1 GiB with flips).
CHUNK_ROWS = 1024
OPEN_FILES = 64  # chunk files a reader keeps open at once


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
              random_flip: bool, cache_text: bool) -> str:
    h = hashlib.sha256()
    for name, module in [("vae", task.vae), *zip(task.text.names, task.text.encoders)]:
        hash_module(h, name, module)
        h.update(json.dumps({k: v for k, v in module.config.items() if not k.startswith("_")} if isinstance(
            module.config, dict) else module.config.to_dict(), sort_keys=True, default=str).encode())
    for tokenizer in task.text.tokenizers:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps({"content": content_key(content), "image_column": image_column,
                         "caption_column": caption_column, "resolution": task.resolution, "center_crop": True,
                         "random_flip": random_flip, "dtype": str(task.weight_dtype),
                         "token_lengths": list(task.text.lengths()), "text": cache_text,
                         "chunk_rows": CHUNK_ROWS, "format": 4},
                        sort_keys=True).encode())
    return h.hexdigest()


def text_bytes(task: TextToImageTask, num_prompts: int, device: torch.device) -> int:
    """What the text encoders' outputs of `num_prompts` prompts take on disk, from one encoded prompt's."""
    hidden, pooled = task.text.encode_prompts([""], device)
    return num_prompts * sum(t[0].numel() * t.element_size() for t in (hidden, pooled) if t is not None)


def _chunks(total: int) -> list[range]:
    return [range(start, min(total, start + CHUNK_ROWS)) for start in range(0, total, CHUNK_ROWS)]


def _chunk_name(kind: str, c: int) -> str:
    return f"{kind}-{c:06d}.safetensors"


@torch.no_grad()
def _encode_images(task: TextToImageTask, dataset: datasets.Dataset, image_column: str, rows: range,
                   random_flip: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """One chunk's latent distributions (center crop; and mirrored) and original sizes, under autocast as in a
    training step, so the values are the ones a step would compute."""
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
    for img in iter_images(dataset, image_column, show_progress=False, rows=rows):
        sizes.append(img.size)
        pending.append(transform(img))
        if len(pending) == CACHE_BATCH:
            encode(pending)
            pending = []
    if pending:
        encode(pending)
    return {**{name: torch.cat(parts).contiguous() for name, parts in latents.items() if parts},
            "sizes": torch.tensor(sizes)}


def _encode_prompts(task: TextToImageTask, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    text, pooled = task.text.encode_prompts(prompts, device)
    return {"text": text.contiguous(), **({"pooled": pooled.contiguous()} if pooled is not None else {})}


def build_cache(directory: Path, task: TextToImageTask, dataset: datasets.Dataset, image_column: str,
                prompts: list[str], random_flip: bool, cache_text: bool, device: torch.device, workers: Workers,
                show_progress: bool = True) -> None:
    """Every image's latents (and every training prompt's text-encoder outputs, with `cache_text`) in chunks, each
    computed by one of `workers` and written as soon as it is done into a staging folder a killed build resumes
    from; then the index, and the folder renamed into place. Every process calls it."""
    staging = directory.parent / f".partial-{directory.name}"
    if workers.index == 0:
        staging.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(staging)
    workers.barrier()
    todo = [("latents", c, rows) for c, rows in enumerate(_chunks(len(dataset)))]
    todo += [("text", c, rows) for c, rows in enumerate(_chunks(len(prompts)))] if cache_text else []
    mine = [todo[i] for i in workers.mine(list(range(len(todo))))
            if not (staging / _chunk_name(*todo[i][:2])).is_file()]

    def advice() -> str:
        return "the chunks written are reused by a rerun; free space or set MEMMIT_CACHE to a folder on another disk"

    for kind, c, rows in tqdm(mine, desc="caching latents", disable=not show_progress, leave=False):
        tensors = (_encode_images(task, dataset, image_column, rows, random_flip, device) if kind == "latents"
                   else _encode_prompts(task, [prompts[i] for i in rows], device))
        write_whole(staging / _chunk_name(kind, c), save(tensors), advice)
    workers.barrier()
    if workers.index == 0:
        index = {"rows": len(dataset), "chunk_rows": CHUNK_ROWS, "text": cache_text}
        write_whole(staging / "prompts.json", json.dumps(prompts).encode(), advice)
        write_whole(staging / "index.json", json.dumps(index).encode(), advice)
        try:
            os.replace(staging, directory)
        except OSError:  # another machine sharing the cache folder moved in the same key's folder first
            if not directory.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    workers.barrier()


def cached_inputs(task: TextToImageTask, dataset: datasets.Dataset, content: list[str], image_column: str,
                  caption_column: str, random_flip: bool, device: torch.device, text_limit_gb: float,
                  workers: Workers = Workers(), show_progress: bool = True) -> "CachedInputs":
    """The cache for this run's settings and data (`content`: its samples' digests), built by `workers` if no
    earlier run left it (every process calls this); inputs that read it. The text encoders' outputs are cached
    while they take at most `text_limit_gb`; above it each step encodes its prompts, as without the cache."""
    prompts = training_prompts(dataset[caption_column], caption_column)
    size = text_bytes(task, len(prompts), device)
    cache_text = size <= text_limit_gb * 1e9
    directory = cache_root() / "latents" / cache_key(task, content, image_column, caption_column, random_flip,
                                                     cache_text)
    found = (directory / "index.json").is_file()
    if not found:
        build_cache(directory, task, dataset, image_column, prompts, random_flip, cache_text, device, workers,
                    show_progress)
    if show_progress:
        what = "latents and text embeddings" if cache_text else "latents"
        print(f"memmit: reusing the cached {what} in {directory}" if found else
              f"memmit: {what} cached in {directory}")
        if not cache_text:
            print(f"memmit: the text encoders' outputs are not cached: {len(prompts):,} prompts would take "
                  f"{size / 1e9:.1f} GB, above cache_text_limit_gb={text_limit_gb:g}; each step encodes its prompts")
    return CachedInputs(str(directory), random_flip, task.inputs)


class CachedInputs:
    """Dataset rows -> model inputs from the cache: each sample's latent mean and std (mirrored when its flip coin
    says so), its prompt's text embedding (and pooled embedding; unless the text is not cached) and, for SDXL, its
    time_ids from its original size; a prompt the caption rules made up is tokenized, for the text encoders to encode
    in the step. Draws what CaptionedImageInputs draws (a center crop draws nothing)."""

    def __init__(self, directory: str, random_flip: bool, prompts: CaptionedImageInputs):
        self.directory, self.random_flip, self.prompts = directory, random_flip, prompts
        layout = json.loads((Path(directory) / "index.json").read_text())
        self.chunk_rows, self.text_cached = layout["chunk_rows"], layout["text"]
        self.index = {p: i for i, p in enumerate(json.loads((Path(directory) / "prompts.json").read_text()))}
        self.columns = (prompts.caption_column,)  # no image is decoded
        self._files: Optional[OrderedDict] = None  # opened in the process that reads (a data-loading worker)

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _files=None)

    def _file(self, kind: str, chunk: int):
        """A chunk file, opened once and kept among the OPEN_FILES most recently read."""
        if self._files is None:
            self._files = OrderedDict()
        name = _chunk_name(kind, chunk)
        if name not in self._files:
            self._files[name] = safe_open(str(Path(self.directory) / name), "pt")
            if len(self._files) > OPEN_FILES:
                self._files.popitem(last=False)
        self._files.move_to_end(name)
        return self._files[name]

    def _rows(self, kind: str, tensor: str, rows: Sequence[int]) -> torch.Tensor:
        return torch.cat([self._file(kind, i // self.chunk_rows).get_slice(tensor)[i % self.chunk_rows:
                                                                                 i % self.chunk_rows + 1]
                          for i in rows])

    def __call__(self, rows: dict, generators: Sequence[torch.Generator], ids: Sequence[int]) -> dict:
        flips = [self.random_flip and bool(torch.rand((), generator=g) < 0.5) for g in generators]
        prompts, text_inputs = self.prompts.text_inputs(rows, generators)
        suffixes = ["_flipped" if flip else "" for flip in flips]
        mean = torch.cat([self._rows("latents", "mean" + s, [i]) for s, i in zip(suffixes, ids)])
        std = torch.cat([self._rows("latents", "std" + s, [i]) for s, i in zip(suffixes, ids)])
        out = {**text_inputs, "latent_mean": mean, "latent_std": std}
        if self.text_cached:
            found = [self.index.get(p) for p in prompts]
            rows_found = [0 if i is None else i for i in found]  # row 0 stands in, unused
            # Anchor captions (dedup_captions=anchor) are encoded in the step, from their tokens.
            out.update(text=self._rows("text", "text", rows_found), encode=torch.tensor([i is None for i in found]))
            if "pooled" in self._file("text", 0).keys():
                out["pooled"] = self._rows("text", "pooled", rows_found)
        if isinstance(self.prompts, MicroConditionedInputs):
            sizes = self._rows("latents", "sizes", ids).tolist()
            out["time_ids"] = self.prompts.time_ids([self.prompts.transform.center_crop_geometry(w, h, flip)
                                                     for (w, h), flip in zip(sizes, flips)])
        return out
