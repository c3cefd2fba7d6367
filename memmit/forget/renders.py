"""The forget set, made from the checkpoint: each prompt rendered from `forget_samples` seeds with the pipeline's own
sampler; the renders that collapse onto one image (one near-duplicate cluster holding at least `forget_share` of the
seeds, Somepalli et al.'s low-diversity signal, SISS's split of reproductions from novel outputs) are the prompt's
reproductions. A prompt whose renders do not collapse is reported as not reproducing and trains as a retained one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import torch
from accelerate import PartialState
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from ..config import FORGET_OPTIONS
from ..data.detectors import Detector
from ..eval.sampling import sample_images
from ..families.stable_diffusion import TextToImageTask

RENDERS = "renders.npz"  # every render of a forget set, forget prompts' first, in ForgetSet.write's folder


def settings_of(cfg) -> dict:
    """The options a forget set is made with, as forget.json records them."""
    return {name: getattr(cfg, name) for name in ("forget_prompts", *FORGET_OPTIONS)}


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 [H, W, C] -> a PIL image (grey for one channel)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def render(task: TextToImageTask, prompts: list[str], samples: int, steps: int, batch_size: int, seed: int,
           device: torch.device, show_progress: bool, state: Optional[PartialState] = None) -> list[np.ndarray]:
    """`samples` renders of each prompt, uint8 [samples, H, W, C]: render j of prompt i from the generator keyed
    (seed, i * samples + j), so a render does not depend on the batch or the number of processes."""
    keep = task.validation_prompts  # sample_images renders through them; the run's round-end grid keeps its own
    verbosity = diffusers_logging.get_verbosity()
    # The pipeline warns of a truncated prompt on every batch that holds it (thousands of lines for a few long
    # prompts); forget_prompts says it once of each forget prompt.
    diffusers_logging.set_verbosity_error()
    flat = [p for p in prompts for _ in range(samples)]
    try:
        images = sample_images(task, len(flat), steps, batch_size, seed, device, show_progress, flat, state)
    finally:
        task.validation_prompts = keep
        diffusers_logging.set_verbosity(verbosity)
    return [images[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def collapsed(images: np.ndarray, detector: Detector, share: float) -> list[int]:
    """The renders of the largest near-duplicate cluster when it holds at least `share` of them, else []."""
    clusters = detector.clusters([to_pil(x) for x in images])
    largest = max(clusters, key=len, default=[])
    return sorted(largest) if len(largest) >= share * len(images) else []


@dataclass
class ForgetSet:
    """What forget mode trains on: the reproductions of each reproducing prompt (anchored to its anchor) and the
    renders of the retained prompts (trained as they are)."""

    prompts: list[str]
    renders: list[np.ndarray]  # each prompt's renders, uint8 [forget_samples, H, W, C]
    copies: list[list[int]]  # each prompt's collapsed renders ([]: it does not reproduce)
    anchors: dict[str, str] = field(default_factory=dict)  # reproducing prompt -> its anchor
    triggers: dict[str, list[dict]] = field(default_factory=dict)  # reproducing prompt -> its words' score drops
    replaced: dict[str, str] = field(default_factory=dict)  # reproducing prompt -> its words' anchor, which copied
    retain_prompts: list[str] = field(default_factory=list)
    retain_renders: list[np.ndarray] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # retain candidates left out: their renders reproduce a copy

    @property
    def reproducing(self) -> list[int]:
        return [i for i, c in enumerate(self.copies) if c]

    @property
    def not_reproducing(self) -> list[str]:
        return [p for p, c in zip(self.prompts, self.copies) if not c]

    def dataset(self, image_column: str, caption_column: str) -> tuple[datasets.Dataset, dict[int, list[str]]]:
        """The rows (reproductions first, then retained renders) and each reproduction row's anchor."""
        images, texts, anchors = [], [], {}
        for i in self.reproducing:
            for j in self.copies[i]:
                anchors[len(images)] = [self.anchors[self.prompts[i]]]
                images.append(to_pil(self.renders[i][j]))
                texts.append(self.prompts[i])
        for prompt, renders in zip(self.retain_prompts, self.retain_renders):
            images.extend(to_pil(x) for x in renders)
            texts.extend([prompt] * len(renders))
        features = datasets.Features({image_column: datasets.Image(), caption_column: datasets.Value("string")})
        return datasets.Dataset.from_dict({image_column: images, caption_column: texts}, features=features), anchors

    def report(self, settings: dict) -> dict:
        return {"settings": settings,
                "prompts": [{"prompt": p, "reproduces": bool(c), "collapsed_renders": c,
                             "share": len(c) / len(r), **({"anchor": self.anchors[p], "words": self.triggers.get(p, []),
                                                              "anchor_reproducing": self.replaced.get(p)}
                                                             if c else {})}
                            for p, r, c in zip(self.prompts, self.renders, self.copies)],
                "retain_prompts": self.retain_prompts, "retain_dropped_as_reproducing": self.dropped}

    def write(self, folder: Path, settings: dict) -> None:
        """forget.json (the split, the anchors, the retained prompts) and each prompt's collapsed renders as PNG
        files, references/<prompt index>-<render>.png: what the run unlearns, to look at and to verify against; and
        every render (RENDERS), which a resumed run trains on again instead of rendering anew: renders on a GPU
        need not repeat bit for bit, and a resume must train on what the checkpoint trained on."""
        refs = folder / "references"
        refs.mkdir(parents=True, exist_ok=True)
        for i in self.reproducing:
            for j in self.copies[i]:
                to_pil(self.renders[i][j]).save(refs / f"{i}-{j}.png")
        np.savez_compressed(folder / RENDERS, *self.renders, *self.retain_renders)
        (folder / "forget.json").write_text(json.dumps(self.report(settings), indent=2))

    @classmethod
    def stored(cls, folder: Path, settings: dict, prompts: list[str]) -> Optional[ForgetSet]:
        """The set `write` left in `folder` when it was made with these settings from these prompts, else None."""
        try:
            report = json.loads((folder / "forget.json").read_text())
        except (OSError, ValueError):
            return None
        rows = report["prompts"]
        if report["settings"] != settings or [r["prompt"] for r in rows] != prompts or not (folder / RENDERS).is_file():
            return None
        with np.load(folder / RENDERS) as arrays:
            images = [arrays[f"arr_{k}"] for k in range(len(arrays.files))]
        copying = [r for r in rows if r["reproduces"]]
        return cls(prompts, images[:len(rows)], [r["collapsed_renders"] for r in rows],
                   anchors={r["prompt"]: r["anchor"] for r in copying},
                   triggers={r["prompt"]: r["words"] for r in copying if r["words"]},
                   # A forget.json written before anchors were replaced has no such key: none was.
                   replaced={r["prompt"]: r["anchor_reproducing"] for r in copying
                             if r.get("anchor_reproducing") is not None},
                   retain_prompts=report["retain_prompts"], retain_renders=images[len(rows):],
                   dropped=report["retain_dropped_as_reproducing"])

    def summary(self) -> str:
        lines = [f"{len(self.reproducing)} of {len(self.prompts)} forget prompts reproduce an image "
                 f"(one near-duplicate cluster holds >= the share of their renders):"]
        lines += [f"  {'reproduces' if c else 'does not reproduce'} ({len(c)}/{len(r)}): {p!r}"
                  + (f" -> anchor {self.anchors[p]!r}" if c and p in self.anchors else "")
                  + (f" (its words' anchor {self.replaced[p]!r} renders a copy)" if p in self.replaced else "")
                  for p, r, c in zip(self.prompts, self.renders, self.copies)]
        lines.append(f"{len(self.retain_prompts)} prompts retained ({len(self.dropped)} candidates left out: their "
                     "renders reproduce a copy)")
        return "\n".join(lines)
