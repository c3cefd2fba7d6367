"""Forget mode's verification (`--evaluate`): the original and the mitigated pipeline render each reproducing prompt
from seeds the run never rendered, and its variants (a word added, a word removed, a typo, a template: small prompt
changes re-trigger copies that local edits only hide, arXiv 2507.16880); a render reproduces when it lies within
the detector's threshold of one of the prompt's references (memmit/forget/references/). The retained prompts'
renders, same seeds before and after, say how much of the rest changed, and their quality without data: the Fréchet
distance to the input pipeline's own renders of other seeds."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Optional

import numpy as np
import torch

from ..data.detectors import Detector
from ..data.features import Extractor, load_extractor
from ..eval.scores import frechet_report
from ..families.stable_diffusion import TextToImageTask
from .renders import render, to_pil

VARIANTS = ("held-out seeds", "word added", "word removed", "typo", "template")
VERIFY_SEED_OFFSET = 2  # the forget renders drew from the run's seed, the retained ones from seed + 1


def prompt_variants(prompt: str) -> dict[str, str]:
    """The prompt itself (new seeds) and four small changes of it, each deterministic."""
    words = prompt.split()
    i = max(range(len(words)), key=lambda k: len(words[k]))
    w = words[i]
    typo = w[0] + w[2] + w[1] + w[3:] if len(w) >= 3 else w + w  # two letters swapped (a short word doubled)
    return {"held-out seeds": prompt,
            "word added": f"{prompt} picture",
            "word removed": " ".join(words[:-1]) if len(words) > 1 else "",
            "typo": " ".join(words[:i] + [typo] + words[i + 1:]),
            "template": f"an image of {prompt}"}


def nearest_distances(renders: np.ndarray, references: np.ndarray, detector: Detector) -> torch.Tensor:
    """Each render's detector distance to its nearest reference."""
    a = detector.features([to_pil(x) for x in renders])
    b = detector.features([to_pil(x) for x in references])
    pairs = torch.cartesian_prod(torch.arange(len(a)), torch.arange(len(b)))
    return detector.distance(a[pairs[:, 0]], b[pairs[:, 1]]).view(len(a), len(b)).min(dim=1).values


def reproduces(renders: np.ndarray, references: np.ndarray, detector: Detector) -> list[bool]:
    """Whether each render lies within the detector's threshold of one of the references."""
    return (nearest_distances(renders, references, detector) <= detector.threshold).tolist()


def retained_quality(before: list[np.ndarray], after: list[np.ndarray], extractor: Optional[Extractor],
                     batch_size: int) -> dict:
    """Fréchet distance of the retained prompts' renders from the first half of the seeds to the input pipeline's
    renders from the second half (no training image needed): the input's own first half gives the floor, what seeds
    alone move; the mitigated pipeline's, how far the rest of its outputs moved. In the extractor's embedding, else
    the eval's Inception FID."""
    half = len(before[0]) // 2

    def images01(renders: list[np.ndarray], part: slice) -> torch.Tensor:
        images = np.concatenate([r[part] for r in renders])
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255

    if half * len(before) < 2:  # a Gaussian fit needs two renders on each side
        skipped = {"available": False, "reason": f"{half * len(before)} render(s) in each half of the seeds"}
        return {"before": skipped, "after": skipped}
    reference = images01(before, slice(half, None))
    embedded = None if extractor is None else extractor(reference, batch_size)
    return {label: frechet_report(images01(renders, slice(0, half)), reference, extractor, batch_size, embedded)
            for label, renders in (("before", before), ("after", after))}


def verify(before: TextToImageTask, after: TextToImageTask, report: dict, references: dict[str, np.ndarray],
           detector: Detector, samples: int, steps: int, batch_size: int, seed: int, device: torch.device,
           show_progress: bool = True, quality_extractor: Optional[Extractor] = None) -> dict:
    """Shares of renders reproducing a reference, per prompt and variant, before and after; the retained prompts'
    mean pixel change (RMS in [0, 2]), the share of their renders (after) that reproduce any reference and their
    Fréchet distances (retained_quality)."""
    reproducing = [p["prompt"] for p in report["prompts"] if p["reproduces"]]
    variants = {p: prompt_variants(p) for p in reproducing}
    flat = [v for p in reproducing for v in variants[p].values()]
    retained = report["retain_prompts"]
    key = seed + VERIFY_SEED_OFFSET
    shares: dict[str, dict] = {}
    every_reference = np.concatenate(list(references.values()))
    change = copied = quality = None
    for label, task in (("before", before), ("after", after)):
        renders = render(task, flat, samples, steps, batch_size, key, device, show_progress)
        for k, (prompt, kind) in enumerate((p, kind) for p in reproducing for kind in VARIANTS):
            row = shares.setdefault(prompt, {}).setdefault(kind, {"prompt": variants[prompt][kind]})
            row[label] = mean(reproduces(renders[k], references[prompt], detector))
        kept = render(task, retained, samples, steps, batch_size, key, device, show_progress) if retained else []
        if label == "before":
            kept_before = kept
        else:
            change = mean(float(np.sqrt(np.mean(((x.astype(float) - y.astype(float)) / 127.5) ** 2)))
                          for a, b in zip(kept_before, kept) for x, y in zip(a, b)) if retained else None
            copied = mean(mean(reproduces(r, every_reference, detector)) for r in kept) if retained else None
            quality = retained_quality(kept_before, kept, quality_extractor, batch_size) if retained else None
    summary = {kind: {label: mean(shares[p][kind][label] for p in reproducing) for label in ("before", "after")}
               for kind in VARIANTS}
    return {"settings": {"samples": samples, "inference_steps": steps, "seed": key, "detector": detector.describe()},
            "summary": summary, "prompts": shares,
            "retained": {"prompts": retained, "mean_pixel_change": change, "share_reproducing_a_reference": copied,
                         "frechet_to_input": quality}}


def load_references(folder: Path, report: dict, channels: int) -> dict[str, np.ndarray]:
    """Each reproducing prompt's references, uint8 [n, H, W, C], from references/<prompt index>-<render>.png."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    out = {}
    for i, p in enumerate(report["prompts"]):
        if p["reproduces"]:
            images = [np.asarray(Image.open(folder / f"{i}-{j}.png").convert(mode)) for j in p["collapsed_renders"]]
            out[p["prompt"]] = np.stack([x[..., None] if x.ndim == 2 else x for x in images])
    return out


def verification_table(result: dict) -> str:
    """Reproducing share of the forget prompts' renders before and after, per kind of prompt; the retained change."""
    lines = ["forget prompts        reproducing before  after  reduction"]
    for kind, row in result["summary"].items():
        cut = f"{1 - row['after'] / row['before']:.0%}" if row["before"] else "-"
        lines.append(f"{kind:<21} {row['before']:>18.1%}  {row['after']:>5.1%}  {cut:>9}")
    kept = result["retained"]
    if kept["mean_pixel_change"] is not None:
        lines.append(f"retained prompts ({len(kept['prompts'])}): renders changed by {kept['mean_pixel_change']:.3f} "
                     f"RMS (of 2); {kept['share_reproducing_a_reference']:.1%} reproduce a reference")
    quality = quality_text(kept)
    if quality:
        lines.append(f"retained prompts: {quality}")
    return "\n".join(lines)


def quality_text(retained: dict) -> Optional[str]:
    """retained_quality in words, when it was measured."""
    quality = retained.get("frechet_to_input")  # verify.json files of before it lack it
    if not quality or not quality["after"]["available"]:
        return None
    return (f"Fréchet distance to the input's renders of other seeds ({quality['after']['extractor']['kind']}) "
            f"{quality['after']['frechet_distance']:.3g}, the input's own {quality['before']['frechet_distance']:.3g} "
            "(what the seeds alone move)")


def load_quality_extractor(cfg, task: TextToImageTask, device: torch.device) -> Optional[Extractor]:
    """--eval_quality_extractor (None: the Inception FID), tried on images of the run's size: build_trainer calls it
    before any render, so one that does not load fails then, not after training."""
    if cfg.eval_quality_extractor is None:
        return None
    probe = torch.full((2, task.channels, task.resolution, task.resolution), 0.5)
    return load_extractor(cfg.eval_quality_extractor, device, probe, "eval_quality_extractor")


def spread(items: list, count: int) -> list:
    """`count` of the items, evenly spaced over their list from the first; all of them when count is 0 or at least
    their number."""
    if not count or count >= len(items):
        return items
    return [items[k * len(items) // count] for k in range(count)]


def verify_run(cfg, out: Path, device: torch.device, show_progress: bool = True) -> dict:
    """--evaluate of a forget run: the input pipeline against the one exported to `out`, on the reproducing prompts
    and verify_retained of the retained ones (evenly spaced over their list, so each kind is in: anchors, the prompts
    that do not reproduce, the user's, neighbours, recombinations); writes memmit/forget/verify.json and returns it."""
    import dataclasses

    from ..data.detectors import load_detector
    from ..families import load_task

    folder = out / "memmit" / "forget"
    report = json.loads((folder / "forget.json").read_text())
    before, after = load_task(cfg), load_task(dataclasses.replace(cfg, pretrained_model_name_or_path=str(out)))
    detector = load_detector(cfg.dedup_features, cfg.dedup_threshold, before.resolution, before.channels, device,
                             use="eval")
    checked = {**report, "retain_prompts": spread(report["retain_prompts"], cfg.verify_retained)}
    result = verify(before, after, checked, load_references(folder / "references", report, before.channels), detector,
                    cfg.forget_samples, cfg.forget_inference_steps, cfg.eval_batch_size, cfg.seed, device,
                    show_progress, load_quality_extractor(cfg, before, device))
    (folder / "verify.json").write_text(json.dumps(result, indent=2))
    return result
