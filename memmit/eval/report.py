"""`memmit eval`'s evaluation: load and check everything before sampling (Prepared), sample, score, and write
report.json, samples.npy and most_copied.png; `rescore` scores saved samples again."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import diffusers
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torch import Tensor

import memmit

from ..config import EvalConfig
from ..data.dataset import caption_counts, check_captions, load_train_dataset, source_names
from ..data.detectors import load_detector
from ..data.feature_store import stored_features
from ..data.features import Extractor, load_extractor
from ..data.neighbours import resolve_search
from ..data.split import duplicate_clusters
from ..families.base import DenoisingTask
from ..workers import Workers
from .figures import draw_most_copied
from .metrics import default_device
from .sampling import (TrainingEmbeddings, TrainingPixels, from_uint8, load_eval_task, load_train_images,
                       sample_images, sample_prompts)
from .scores import score_samples

logger = logging.getLogger(__name__)


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
    # The feature and quality extractors' embeddings of `train`, by role (from the feature store)
    train_embeddings: dict[str, Tensor] = dataclasses.field(default_factory=dict)


def load_eval_dataset(config: EvalConfig, task: DenoisingTask) -> datasets.Dataset:
    """The training set the evaluation compares with (and draws prompts from), its captions checked."""
    ds = load_train_dataset(config.dataset_name, config.train_data_dir, config.image_column,
                            max_train_samples=config.max_train_samples,
                            dataset_config_name=config.dataset_config_name, extra_columns=task.extra_columns)
    check_captions(ds, task.caption_column, config.image_column)
    return ds


def prepare_evaluation(config: EvalConfig, show_progress: bool = True,
                       workers: Workers = Workers()) -> Optional[Prepared]:
    """Load model, data and extractors; every bad input raises ValueError here, before sampling. Under `accelerate
    launch` every process calls it with its `workers`: they compute the training images' features together
    (data/feature_store.py), and the main process alone gets the Prepared (the others None)."""
    task = load_eval_task(config)
    ds = load_eval_dataset(config, task)
    resolve_search(config.dedup_search, len(ds))  # an index that cannot fit the data fails before any work
    device = default_device()
    detector = load_detector(config.dedup_features, config.dedup_threshold, task.resolution, task.channels, device,
                             use="eval", search=config.dedup_search)
    clusters = duplicate_clusters(ds, config.image_column, detector, show_progress, workers=workers,
                                  features_dir=config.dedup_features_dir)
    pixels = TrainingPixels(task.transform)
    probe = (pixels.images(ds.select(range(min(2, len(ds))))[config.image_column]) + 1) / 2
    # Every process loads the embedding models: they embed the training set together, as they compute its pixels.
    embedders = {role: load_extractor(path, device, probe, role)
                 for role, path in (("feature_extractor", config.feature_extractor),
                                    ("quality_extractor", config.quality_extractor)) if path}
    train = load_train_images(ds, config.image_column, task.transform, show_progress, workers)
    embeddings = {role: stored_features(TrainingEmbeddings(pixels, extractor, config.batch_size), ds,
                                        config.image_column, workers, show_progress=show_progress)
                  for role, extractor in embedders.items()}
    if workers.index != 0:
        return None
    # memorization_report would say so too, but only after sampling.
    if torch.unique(train.flatten(1), dim=0).shape[0] < 2:
        raise ValueError("the training set needs at least two distinct images at this resolution")
    classifier = (load_extractor(config.alignment_classifier, device, probe, "alignment_classifier")
                  if config.alignment_classifier else None)
    classes = classifier(probe, 2).shape[1] if classifier is not None else None
    if classes is not None and classes != len(config.class_names):
        raise ValueError(f"alignment_classifier {config.alignment_classifier!r} scores {classes} classes, and "
                         f"class_names names {len(config.class_names)}")
    prompts, duplicated = None, frozenset()
    if config.caption_column:
        captions = ds[config.caption_column]
        prompts = sample_prompts(captions, config.num_samples, config.seed, config.caption_column)
        duplicated = frozenset(c for c, n in caption_counts(captions, config.caption_column).items() if n > 1)
    return Prepared(config, task, train, source_names(ds, config.image_column), embedders.get("feature_extractor"),
                    embedders.get("quality_extractor"), device, clusters, detector.describe(), prompts, duplicated,
                    classifier, embeddings)


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
                           train_embeddings=p.train_embeddings, batch_size=c.batch_size)
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
    p = prepare_evaluation(config, show_progress, eval_workers(state))
    samples = sample_on_processes(p, config, state, show_progress)
    return run_evaluation(p, show_progress, samples) if p is not None else None


def eval_workers(state: Optional[PartialState]) -> Workers:
    """The processes that share the evaluation's feature work: all of a launched run's, else this one."""
    return Workers.of(state, every_machine=False) if state is not None and state.num_processes > 1 else Workers()
