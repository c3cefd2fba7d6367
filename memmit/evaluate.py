"""`memmit eval`: sample a pipeline, measure how much it copies its training set; `memmit compare`: tabulate reports.

Sampling and scoring are separate steps: `sample_images` gives uint8 images (saved as samples.npy), and
`score_samples` turns samples and training images into the report, so anyone can rescore saved samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import datasets
import diffusers
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from tqdm.auto import tqdm

import memmit

from .config import EvalConfig, parse_args
from .data import caption_counts, check_captions, iter_images, load_train_dataset, pick_caption, source_names
from .detectors import load_detector
from .draws import keyed_generator
from .families import load_task
from .features import Extractor, load_extractor
from .metrics import (cluster_labels, cluster_memorization_report, default_device, exact_clusters,
                      first_occurrence, frechet_distance, memorization_report)
from .split import duplicate_clusters
from .tasks import DenoisingTask, UnconditionalTask

logger = logging.getLogger(__name__)

MOST_COPIED = 10  # training images listed in the report
FIGURE_PAIRS = 16  # sample / nearest-training-image pairs drawn in most_copied.png
FIGURE_MIN_SIDE = 64  # images are upscaled to at least this many pixels so 16px digits are legible
MQ_THRESHOLD = "0.5"  # the neighbourhood-score threshold `compare` shows
MEMBERS_LISTED = 8  # members of a most-copied cluster named in the report



def to_uint8(images01: Tensor) -> np.ndarray:
    """[N, C, H, W] in [0, 1] -> uint8 [N, H, W, C], rounded as diffusers' numpy_to_pil rounds."""
    return (images01 * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, C] -> [N, C, H, W] in [-1, 1], exactly as ImageTransform scales training images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def sample_generators(seed: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, sample index): an image depends neither on the device nor
    on which process renders its batch."""
    return [keyed_generator(seed, i) for i in indices]


def sample_images(task: DenoisingTask, num_samples: int, num_inference_steps: int, batch_size: int,
                  seed: int, device: torch.device, show_progress: bool = True,
                  prompts: Optional[list[str]] = None, state: Optional[PartialState] = None) -> np.ndarray:
    """DDIM samples as uint8 [N, H, W, C]; a text-to-image task renders `prompts[i]` for sample i.

    Batches are cut at multiples of batch_size whatever the process count; with a distributed `state`, process p
    renders batches p, p + P, ... and every process receives all of them in order, the images one process makes."""
    task.prepare(device, torch.float32)  # frozen parts (VAE, text encoder) to the device, if any
    denoiser = task.denoiser.to(device).eval()
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    mine = []
    for start in tqdm(range(0, num_samples, batch_size)[rank::world], desc="sampling", disable=not show_progress):
        indices = range(start, min(start + batch_size, num_samples))
        if prompts is not None:
            task.validation_prompts = prompts[indices.start:indices.stop]  # the task renders its validation prompts
        images = task.sample(denoiser, len(indices), num_inference_steps, sample_generators(seed, indices))
        mine.append((start, to_uint8(images)))
    batches = gather_object(mine) if world > 1 else mine
    return np.concatenate([images for _, images in sorted(batches, key=lambda batch: batch[0])])


def sample_prompts(captions: list, num_samples: int, seed: int, column: str) -> list[str]:
    """One training caption per sample: a row drawn with a seed, then one of its captions."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(captions), (num_samples,), generator=generator).tolist()
    return [pick_caption(captions[i], generator, column) for i in picks]


def load_train_images(ds: datasets.Dataset, image_column: str, transform: Callable,
                      show_progress: bool = True) -> Tensor:
    """Every training image through `transform`, stacked: [N, C, H, W] in [-1, 1]; an unreadable file
    fails by name."""
    return torch.stack([transform(img) for img in iter_images(ds, image_column, "loading training images",
                                                               show_progress)])


def _most_copied(copied_counts: dict[int, int], sources: list[str]) -> list[dict]:
    return [{"index": i, "source": sources[i], "count": c} for i, c in list(copied_counts.items())[:MOST_COPIED]]


def _most_copied_clusters(per_sample: dict, clusters: list[list[int]], sources: list[str]) -> list[dict]:
    """Near-duplicate families (and lone images) by how many samples copy one of their members."""
    counts: dict[int, int] = {}
    for c, copied in zip(per_sample["cluster"].tolist(), per_sample["memorized"].tolist()):
        if copied:
            counts[c] = counts.get(c, 0) + 1
    labels = cluster_labels(len(sources), clusters).tolist()
    rows = []
    for c, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:MOST_COPIED]:
        members = clusters[c] if c < len(clusters) else [labels.index(c)]
        rows.append({"count": n, "size": len(members), "members": [sources[i] for i in members[:MEMBERS_LISTED]],
                     "ids": list(members[:MEMBERS_LISTED])})
    return rows


def _pixel_report(samples: Tensor, train: Tensor, sources: list[str], k: int, threshold: float,
                  clusters: list[list[int]], detector: dict) -> dict:
    """d1/d2 and neighbourhood criteria in pixels, one neighbour per near-duplicate cluster; the byte-identical
    figures (only exact copies merged) beside them."""
    rep = cluster_memorization_report(samples.flatten(1), train.flatten(1), clusters, k=k, threshold=threshold)
    exact = memorization_report(samples.flatten(1), train.flatten(1), k=k, threshold=threshold)["summary"]
    summary = dict(rep["summary"])
    summary["fraction_memorized_by_score"] = {f"{t:g}": v for t, v in summary["fraction_memorized_by_score"].items()}
    summary["num_distinct_train"] = exact["num_distinct_train"]
    summary["clusters"] = {"detector": detector, "num_clusters": len(clusters),
                           "num_samples_in_clusters": sum(len(c) for c in clusters),
                           "largest": max((len(c) for c in clusters), default=1), "groups": clusters}
    summary["byte_identical"] = {
        "fraction_memorized_ratio": exact["fraction_memorized_ratio"],
        "fraction_memorized_by_score": {f"{t:g}": v for t, v in exact["fraction_memorized_by_score"].items()}}
    summary["most_copied"] = _most_copied(summary.pop("copied_counts"), sources)
    summary["most_copied_clusters"] = _most_copied_clusters(rep["per_sample"], clusters, sources)
    summary["per_sample"] = {name: v.tolist() for name, v in rep["per_sample"].items()}
    return summary


def _feature_report(samples01: Tensor, train01: Tensor, sources: list[str], extractor: Extractor,
                    batch_size: int) -> dict:
    rep = memorization_report(extractor(samples01, batch_size), extractor(train01, batch_size), metric="cosine")
    summary = {"extractor": extractor.info, **rep["summary"]}
    summary["most_copied"] = _most_copied(summary.pop("copied_counts"), sources)
    summary["per_sample"] = {name: v.tolist() for name, v in rep["per_sample"].items()}
    return summary


def _inception_fid(samples01: Tensor, train01: Tensor, batch_size: int) -> dict:
    """torchmetrics' FID when torch-fidelity and its Inception weights load (offline they may not)."""
    info = {"kind": "inception-v3", "via": "torchmetrics FrechetInceptionDistance"}
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        # Inception at 299x299 over a whole training set is hours on a CPU, minutes on a GPU.
        fid = FrechetInceptionDistance(feature=2048, normalize=True).to(default_device())
    except (ImportError, OSError, RuntimeError) as exc:  # missing package, or weights not downloadable
        return {"available": False, "extractor": info, "reason": f"{type(exc).__name__}: {exc}"}
    for images, real in ((samples01, False), (train01, True)):
        for i in range(0, images.shape[0], batch_size):
            batch = images[i:i + batch_size]
            batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch[:, :3]
            fid.update(batch.to(fid.device), real=real)
    return {"available": True, "extractor": info, "frechet_distance": fid.compute().item()}


def _quality_report(samples01: Tensor, train01: Tensor, clusters: list[list[int]], extractor: Optional[Extractor],
                    batch_size: int) -> dict:
    """Fréchet distance to one training image per near-duplicate family: against the raw set, a model that
    copies duplicated images would be rewarded for matching their inflated frequency."""
    labels = cluster_labels(train01.shape[0], clusters)
    reference = train01[first_occurrence(labels, int(labels.max()) + 1)]
    report = (_inception_fid(samples01, reference, batch_size) if extractor is None else
              {"available": True, "extractor": extractor.info,
               "frechet_distance": frechet_distance(extractor(samples01, batch_size), extractor(reference, batch_size))})
    return {**report, "reference": f"one of each of {len(reference)} near-duplicate families and lone images, "
                                   f"of {len(train01)} training images"}


def score_samples(samples: Tensor, train: Tensor, sources: list[str], *, clusters: Optional[list[list[int]]] = None,
                  detector: Optional[dict] = None, k: int = 50, threshold: float = 1 / 3,
                  feature_extractor: Optional[Extractor] = None, quality_extractor: Optional[Extractor] = None,
                  batch_size: int = 64) -> dict:
    """The memorization and quality report of `samples` against `train`, both [N, C, H, W] in [-1, 1].

    `clusters` (near-duplicate families of training ids, found by `detector`) count once as neighbours.
    Keys: "pixel" (L2 ratio and neighbourhood criteria), "features" (cosine in the feature
    extractor's space, or None), "quality" (Fréchet distance, or why it is unavailable).
    """
    if clusters is None:  # without a detector's clusters, byte-identical training images are one
        clusters, detector = exact_clusters(train.flatten(1)), {"features": "byte-identical", "threshold": 0.0}
    samples01, train01 = (samples + 1) / 2, (train + 1) / 2
    features = (None if feature_extractor is None
                else _feature_report(samples01, train01, sources, feature_extractor, batch_size))
    return {"pixel": _pixel_report(samples, train, sources, k, threshold, clusters, detector),
            "features": features,
            "quality": _quality_report(samples01, train01, clusters, quality_extractor, batch_size)}


def _to_pil(image: np.ndarray, scale: int) -> Image.Image:
    """uint8 [H, W, C] -> an RGB PIL image upscaled by `scale` without smoothing."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def draw_most_copied(samples: np.ndarray, train: Tensor, pixel: dict, path: Path, columns: int = 4) -> None:
    """The samples closest to copying (lowest d1/d2) beside their nearest training image, captioned."""
    per_sample = pixel["per_sample"]
    order = sorted(range(len(per_sample["ratio"])), key=lambda i: per_sample["ratio"][i])[:FIGURE_PAIRS]
    train_u8 = to_uint8((train + 1) / 2)
    scale = max(1, math.ceil(FIGURE_MIN_SIDE / samples.shape[1]))
    side, gap, caption = samples.shape[1] * scale, 8, 14
    pair = 2 * side + 2
    font = ImageFont.load_default()
    title = (f"sample | nearest training image   d: L2 distance, r: d1/d2 (copy if r < {pixel['threshold']:.3g}), "
             "xN: its near-duplicate family's size")
    cols = min(columns, len(order))
    width = max(cols * (pair + gap) + gap, int(font.getlength(title)) + 2 * gap)
    rows = math.ceil(len(order) / cols)
    canvas = Image.new("RGB", (width, 20 + rows * (side + caption + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title, fill="black", font=font)
    for slot, i in enumerate(order):
        x = gap + (slot % cols) * (pair + gap)
        y = 20 + (slot // cols) * (side + caption + gap)
        canvas.paste(_to_pil(samples[i], scale), (x, y))
        canvas.paste(_to_pil(train_u8[per_sample["nearest_index"][i]], scale), (x + side + 2, y))
        copied = per_sample["memorized"][i]
        family = per_sample["cluster_size"][i]
        draw.text((x, y + side + 1), f"d={per_sample['d1'][i]:.2f} r={per_sample['ratio'][i]:.2f}"
                  + (f" x{family}" if family > 1 else ""), fill="red" if copied else "black", font=font)
    canvas.save(path)


def _describe_top(top: Optional[dict]) -> str:
    if top is None:
        return "none"
    # source_names falls back to "index i" when a dataset stores no file paths.
    name = top["source"] if top["source"] == f"index {top['index']}" else f"{top['source']} (index {top['index']})"
    return f"{name}, copied by {top['count']} sample{'s' if top['count'] != 1 else ''}"


def _describe_family(top: Optional[dict]) -> str:
    if top is None:
        return "none"
    return (f"{top['size']} image{'s' if top['size'] != 1 else ''} ({top['members'][0]}, ...), copied by "
            f"{top['count']} sample{'s' if top['count'] != 1 else ''}")


def _pct(fraction: Optional[float]) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def format_report(report: dict) -> str:
    """The main numbers as a plain-text table."""
    pixel, features, quality = report["pixel"], report["features"], report["quality"]
    clusters = pixel["clusters"]
    top = pixel["most_copied"][0] if pixel["most_copied"] else None
    by_score = pixel["fraction_memorized_by_score"]
    rows = [("samples / training images (distinct)",
             f"{pixel['num_samples']} / {pixel['num_train']} ({pixel['num_distinct_train']})"),
            (f"memorized, d1/d2 < {pixel['threshold']:.3g}", f"{100 * pixel['fraction_memorized_ratio']:.1f}%"),
            ("  counting only byte-identical copies as one",
             f"{100 * pixel['byte_identical']['fraction_memorized_ratio']:.1f}%"),
            (f"near-duplicate clusters ({clusters['detector']['features']} < {clusters['detector']['threshold']:g})",
             f"{clusters['num_clusters']} holding {clusters['num_samples_in_clusters']} images, largest "
             f"{clusters['largest']}"),
            (f"neighbourhood score < {min(by_score, key=float)} .. {max(by_score, key=float)}",
             " ".join(f"{100 * v:.1f}%" for v in by_score.values())),
            ("most copied training image", _describe_top(top)),
            ("most copied family", _describe_family(pixel["most_copied_clusters"][0] if pixel["most_copied_clusters"]
                                                    else None))]
    if features is not None:
        cos = features["cosine"]
        rows.append((f"cosine ({features['extractor']['kind']}) mean / p95 / >0.5",
                     f"{cos['mean']:.3f} / {cos['p95']:.3f} / {100 * cos['frac_above_0_5']:.1f}%"))
    for name, group in ((name, report["prompts"][name]) for name in ("duplicated", "other") if "prompts" in report):
        rows.append((f"  for {name} captions as prompts ({group['num_samples']} samples)",
                     _pct(group["fraction_memorized_ratio"])))
    if "alignment" in report.get("prompts", {}):
        aligned = report["prompts"]["alignment"]
        rows.append((f"prompt alignment ({aligned['num_samples_naming_one_class']} samples naming a class)",
                     _pct(aligned["fraction_aligned"])))
        # (reports reused from before 2026-12-03 lack the split)
        rows += [(f"  for {name} captions as prompts", _pct(aligned[f"fraction_aligned_{name}"]))
                 for name in ("duplicated", "other") if f"fraction_aligned_{name}" in aligned]
    rows.append((f"Frechet distance ({quality['extractor']['kind']})",
                 f"{quality['frechet_distance']:.3f}" if quality["available"] else f"unavailable: {quality['reason']}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@dataclass
class Prepared:
    """Everything `run_evaluation` needs, loaded and checked."""

    config: EvalConfig
    task: DenoisingTask
    train: Tensor  # [N, C, H, W] in [-1, 1]
    sources: list[str]
    feature_extractor: Optional[Extractor]
    quality_extractor: Optional[Extractor]
    device: torch.device
    clusters: list[list[int]]  # near-duplicate families of training ids, by the training-time detector
    detector: dict
    prompts: Optional[list[str]] = None  # text-to-image: one training caption per sample
    duplicated_captions: frozenset[str] = frozenset()  # captions occurring more than once in the training data
    alignment_classifier: Optional[Extractor] = None


def load_eval_task(config: EvalConfig) -> DenoisingTask:
    # Samples are compared with whole training images: centre crops, no flips.
    # --detect_prompts brings its own prompts, or says itself that it needs the captions.
    task = load_task(SimpleNamespace(**dataclasses.asdict(config), center_crop=True, random_flip=False),
                     captions=not config.detect_prompts)
    if not isinstance(task, UnconditionalTask):  # Stable Diffusion renders any height and width asked for
        return task
    # DDIMPipeline samples at the UNet's configured sample_size; a convolutional UNet runs at any multiple.
    task.denoiser.register_to_config(sample_size=task.resolution)
    return task


def load_eval_dataset(config: EvalConfig, task: DenoisingTask) -> datasets.Dataset:
    """The training set the evaluation compares with (and draws prompts from), its captions checked."""
    ds = load_train_dataset(config.dataset_name, config.train_data_dir, config.image_column,
                            max_train_samples=config.max_train_samples,
                            dataset_config_name=config.dataset_config_name, extra_columns=task.extra_columns)
    check_captions(ds, task.caption_column, config.image_column)
    return ds


def prepare_evaluation(config: EvalConfig, show_progress: bool = True) -> Prepared:
    """Load model, data and extractors; every bad input raises ValueError here, before sampling."""
    task = load_eval_task(config)
    ds = load_eval_dataset(config, task)
    train = load_train_images(ds, config.image_column, task.transform, show_progress)
    # memorization_report would say so too, but only after sampling.
    if torch.unique(train.flatten(1), dim=0).shape[0] < 2:
        raise ValueError("the training set needs at least two distinct images at this resolution")
    device = default_device()
    detector = load_detector(config.dedup_features, config.dedup_threshold, task.resolution, task.channels, device,
                             use="eval")
    clusters = duplicate_clusters(ds, config.image_column, detector, show_progress)
    probe = (train[:2] + 1) / 2
    extractors = {role: load_extractor(path, device, probe, role) if path else None
                  for role, path in (("feature_extractor", config.feature_extractor),
                                     ("quality_extractor", config.quality_extractor),
                                     ("alignment_classifier", config.alignment_classifier))}
    classes = extractors["alignment_classifier"](probe, 2).shape[1] if config.alignment_classifier else None
    if classes is not None and classes != len(config.class_names):
        raise ValueError(f"alignment_classifier {config.alignment_classifier!r} scores {classes} classes, and "
                         f"class_names names {len(config.class_names)}")
    prompts, duplicated = None, frozenset()
    if config.caption_column:
        captions = ds[config.caption_column]
        prompts = sample_prompts(captions, config.num_samples, config.seed, config.caption_column)
        duplicated = frozenset(c for c, n in caption_counts(captions, config.caption_column).items() if n > 1)
    return Prepared(config, task, train, source_names(ds, config.image_column),
                    extractors["feature_extractor"], extractors["quality_extractor"], device, clusters,
                    detector.describe(), prompts, duplicated, extractors["alignment_classifier"])


def named_class(prompt: str, class_names: list[str]) -> Optional[int]:
    """The class a prompt names: the one class name among its words (case and punctuation aside), else None."""
    words = {word.strip(".,;:!?\"'()").lower() for word in prompt.split()}
    named = [c for c, name in enumerate(class_names) if name.lower() in words]
    return named[0] if len(named) == 1 else None


def prompt_report(p: Prepared, memorized: list[bool], samples01: Tensor) -> dict:
    """Memorization apart for prompts that are duplicated training captions and for the rest (known without
    ground truth), and, with an alignment classifier, the share of samples showing the class their prompt names."""
    groups = {"duplicated": [i for i, q in enumerate(p.prompts) if q in p.duplicated_captions]}
    groups["other"] = [i for i, q in enumerate(p.prompts) if q not in p.duplicated_captions]
    report = {"definition": "duplicated: the prompt occurs as a caption more than once in the training data",
              **{name: {"num_samples": len(ids),
                        "fraction_memorized_ratio": sum(memorized[i] for i in ids) / len(ids) if ids else None}
                 for name, ids in groups.items()}}
    if p.alignment_classifier is not None:
        named = [named_class(q, p.config.class_names) for q in p.prompts]
        ids = [i for i, c in enumerate(named) if c is not None]
        predicted = p.alignment_classifier(samples01[ids], p.config.batch_size).argmax(1).tolist() if ids else []
        aligned = {i: predicted[j] == named[i] for j, i in enumerate(ids)}

        def share(among: list[int]) -> Optional[float]:
            return sum(aligned[i] for i in among) / len(among) if among else None

        # Apart too: a copy of a training image shows the named class, so copying alone raises alignment on
        # duplicated captions (EFFICACY.md); the other prompts' share is the one copying does not inflate.
        report["alignment"] = {"classifier": p.alignment_classifier.info, "class_names": p.config.class_names,
                               "num_samples_naming_one_class": len(ids), "fraction_aligned": share(ids),
                               **{f"fraction_aligned_{name}": share([i for i in members if i in aligned])
                                  for name, members in groups.items()}}
    return report


def run_evaluation(p: Prepared, show_progress: bool = True, samples: Optional[np.ndarray] = None,
                   fingerprint: Optional[str] = None) -> dict:
    """Sample (unless `samples` are given, to rescore), score, and write report.json, samples.npy
    and most_copied.png to config.output_dir; `fingerprint` (memmit.audit's) is recorded to reuse the report."""
    c = p.config
    if samples is None:
        samples = sample_on_processes(p, c, None, show_progress)
    scores = score_samples(from_uint8(samples), p.train, p.sources, clusters=p.clusters, detector=p.detector,
                           k=c.k, threshold=c.threshold,
                           feature_extractor=p.feature_extractor, quality_extractor=p.quality_extractor,
                           batch_size=c.batch_size)
    # The options, then what they resolved to and how the samples were made.
    report = {"settings": {**dataclasses.asdict(c), "resolution": p.task.resolution, "channels": p.task.channels,
                           "sampler": p.task.sampler, "pipeline": type(p.task.pipeline).__name__, "device": str(p.device)},
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "memmit": memmit.__version__},
              **({"fingerprint": fingerprint} if fingerprint else {}),
              **scores,
              **({"prompts": prompt_report(p, scores["pixel"]["per_sample"]["memorized"],
                                           (from_uint8(samples) + 1) / 2)} if p.prompts is not None else {}),
              "files": {"samples": "samples.npy", "figure": "most_copied.png",
                        **({"prompts": "prompts.json"} if p.prompts is not None else {})}}
    out = Path(c.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", samples)
    if p.prompts is not None:
        (out / "prompts.json").write_text(json.dumps(p.prompts, indent=1))
    draw_most_copied(samples, p.train, scores["pixel"], out / "most_copied.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def rescore(report_dir: str | Path, show_progress: bool = False) -> dict:
    """Score a finished evaluation's saved samples again, with this memmit's metrics; rewrites its report."""
    report_dir = Path(report_dir)
    settings = json.loads((report_dir / "report.json").read_text())["settings"]
    # A report from an older memmit lacks the options added since: they take their defaults.
    options = {f.name for f in dataclasses.fields(EvalConfig)} - {"output_dir"}
    config = EvalConfig(**{k: v for k, v in settings.items() if k in options}, output_dir=str(report_dir))
    return run_evaluation(prepare_evaluation(config, show_progress), show_progress,
                          samples=np.load(report_dir / "samples.npy"))


def sample_on_processes(p: Optional[Prepared], config: EvalConfig, state: Optional[PartialState],
                        show_progress: bool = True) -> np.ndarray:
    """Every process calls this, the main one with its Prepared (the others with None): each renders its share of
    the samples, on its own device, from the main process's prompts; every process returns all the samples."""
    distributed = state is not None and state.num_processes > 1
    # Only the main process loads data and extractors; the others load the pipeline and take its prompts.
    prompts = broadcast_object_list([p.prompts if p is not None else None])[0] if distributed else p.prompts
    task = p.task if p is not None else load_eval_task(config)
    if distributed:
        batches = len(range(0, config.num_samples, config.batch_size)[state.process_index::state.num_processes])
        logger.info("memmit: process %d of %d samples %d of the %d batches", state.process_index,
                    state.num_processes, batches, math.ceil(config.num_samples / config.batch_size))
    return sample_images(task, config.num_samples, config.num_inference_steps, config.batch_size, config.seed,
                         state.device if distributed else p.device, show_progress, prompts,
                         state if distributed else None)


def evaluate(config: EvalConfig, show_progress: bool = True,
             state: Optional[PartialState] = None) -> Optional[dict]:
    """Sample `config.num_samples` images from the pipeline and report how many copy the training set.

    Writes report.json, samples.npy and most_copied.png to `config.output_dir` and returns the report. With a
    distributed `state`, every process samples its share and the main process scores, writes and returns it.
    """
    main = state is None or state.is_main_process
    p = prepare_evaluation(config, show_progress) if main else None
    samples = sample_on_processes(p, config, state, show_progress)
    return run_evaluation(p, show_progress, samples) if main else None


def eval_main(argv: list[str] | None = None) -> int:
    """`memmit eval`, also under `accelerate launch` (sampling split across the processes): bad input exits 2 with
    one message, before sampling."""
    from .detect import detect_prompts, format_detection

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_args(argv, EvalConfig, prog="memmit eval")
        if config.detect_prompts:  # one process: a few UNet steps per prompt
            report = detect_prompts(config)
        else:
            # Under `accelerate launch`, its processes (ACCELERATE_USE_CPU: gloo processes on CPUs, as for training).
            state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
            # Only the main process loads and checks; the others wait for its prompts, and the launcher stops them.
            report = evaluate(config, state.is_local_main_process, state)
            # Left to the interpreter's exit, gloo's threads may abort a process ("terminate called without an
            # active exception") that has finished its share while the main process still scores.
            state.destroy_process_group()
    except ValueError as exc:
        print(f"memmit: error: {exc}", file=sys.stderr)
        return 2
    if config.detect_prompts:
        print(format_detection(report))
        print(f"memmit: ranking written to {Path(config.output_dir) / 'detect_prompts.json'}")
    elif report is not None:
        print(format_report(report))
        print(f"memmit: report written to {Path(config.output_dir) / 'report.json'}")
    return 0


def _load_report(path: str) -> dict:
    """A report.json, or the one inside a directory."""
    file = Path(path) / "report.json" if Path(path).is_dir() else Path(path)
    try:
        report = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read report {str(file)!r}: {exc}") from exc
    if not isinstance(report, dict) or "pixel" not in report:
        raise ValueError(f"{str(file)!r} is not a memmit eval report")
    return report


def compare_rows(reports: list[dict], labels: list[str]) -> list[dict]:
    """The numbers `compare` shows, one dict per report."""
    rows = []
    for label, r in zip(labels, reports):
        quality, prompts = r.get("quality") or {}, r.get("prompts", {})
        alignment = prompts.get("alignment", {})
        rows.append({"label": label,
                     "memorized_pct": 100 * r["pixel"]["fraction_memorized_ratio"],
                     "mq_pct": 100 * r["pixel"]["fraction_memorized_by_score"][MQ_THRESHOLD],
                     "top_count": r["pixel"]["most_copied"][0]["count"] if r["pixel"]["most_copied"] else 0,
                     "quality": quality.get("frechet_distance") if quality.get("available") else None,
                     "duplicated_prompts": prompts.get("duplicated", {}).get("fraction_memorized_ratio"),
                     "other_prompts": prompts.get("other", {}).get("fraction_memorized_ratio"),
                     "aligned": alignment.get("fraction_aligned"),
                     "aligned_other": alignment.get("fraction_aligned_other")})
    return rows


def format_compare(rows: list[dict]) -> str:
    # Text-to-image columns only where some report has them.
    extra = [(key, name) for key, name in (("duplicated_prompts", "dup. prompts mem."),
                                           ("other_prompts", "other prompts mem."), ("aligned", "aligned"),
                                           ("aligned_other", "aligned, other prompts"))
             if any(r[key] is not None for r in rows)]
    header = ("report", "memorized %", f"MQ<{MQ_THRESHOLD} %", "top copies", "Frechet dist.", *(n for _, n in extra))
    cells = [header] + [(r["label"], f"{r['memorized_pct']:.1f}", f"{r['mq_pct']:.1f}", str(r["top_count"]),
                         "-" if r["quality"] is None else f"{r['quality']:.3f}", *(_pct(r[key]) for key, _ in extra))
                        for r in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
                     for row in cells)


def draw_compare(rows: list[dict], path: Path) -> None:
    """Horizontal bars of memorized % per report, labelled with the report and its value."""
    font = ImageFont.load_default()
    label_w = int(max(font.getlength(r["label"]) for r in rows)) + 16
    bar_max, row_h, top = 400, 28, 30
    longest = max(max(r["memorized_pct"] for r in rows), 1.0)  # all-zero reports still draw an axis
    canvas = Image.new("RGB", (label_w + bar_max + 70, top + row_h * len(rows) + 10), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 8), "memorized samples (%, d1/d2 criterion)", fill="black", font=font)
    for i, r in enumerate(rows):
        y = top + i * row_h
        length = round(bar_max * r["memorized_pct"] / longest)
        draw.text((8, y + 6), r["label"], fill="black", font=font)
        draw.rectangle((label_w, y + 2, label_w + max(length, 1), y + row_h - 4), fill=(70, 110, 180))
        draw.text((label_w + length + 6, y + 6), f"{r['memorized_pct']:.1f}%", fill="black", font=font)
    canvas.save(path)


def compare_main(argv: list[str] | None = None) -> int:
    """`memmit compare`: a table and a bar chart of several eval reports."""
    p = argparse.ArgumentParser(prog="memmit compare", description="Compare memmit eval reports.")
    p.add_argument("reports", nargs="+", help="report.json files (or the directories holding them).")
    p.add_argument("--labels", nargs="+", help="One label per report (default: each report's directory name).")
    p.add_argument("--output", help="Figure path (default: compare.png next to the first report).")
    args = p.parse_args(argv)
    try:
        if args.labels is not None and len(args.labels) != len(args.reports):
            raise ValueError(f"got {len(args.labels)} labels for {len(args.reports)} reports")
        reports = [_load_report(r) for r in args.reports]
    except ValueError as exc:
        print(f"memmit: error: {exc}", file=sys.stderr)
        return 2
    first = Path(args.reports[0])
    labels = args.labels or [(Path(r) if Path(r).is_dir() else Path(r).parent).resolve().name for r in args.reports]
    output = Path(args.output) if args.output else (first if first.is_dir() else first.parent) / "compare.png"
    rows = compare_rows(reports, labels)
    print(format_compare(rows))
    draw_compare(rows, output)
    print(f"memmit: figure written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(eval_main())
