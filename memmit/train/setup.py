"""Everything before the loop, in the order a run needs it: the output folder checked, the accelerator, the task and
its family defaults, the detector, the data and its split, the live model and the latent cache; then the trainer is
wired from them (and resumed when asked). Bad input raises ValueError here, before any training."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed

from ..config import MemmitConfig, check_mixed_precision, options_given
from ..data.content import sample_digests
from ..data.dataset import check_captions, check_images, load_train_dataset
from ..data.detectors import Detector, load_detector
from ..data.neighbours import resolve_search
from ..data.split import Split, build_split, split_shards
from ..families import load_task
from ..families.base import DenoisingTask
from ..families.latents import cached_inputs, check_cache_latents
from ..families.stable_diffusion import TextToImageTask
from ..families.text import frozen_copy
from ..forget.build import build_forget_set, forget_prompts
from ..forget.renders import ForgetSet, settings_of
from ..forget.verify import load_quality_extractor
from ..workers import Workers
from . import checkpoint as ckpt
from .export import check_export
from .group import ShardGroup
from .model import LiveModel
from .trainer import Trainer

logger = get_logger(__name__)

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # the frozen parts' dtype under mixed precision


@dataclass
class TrainingData:
    """The training set, its fixed shard split and its samples' content digests."""

    dataset: datasets.Dataset
    split: Split
    content: list[str]  # each sample's digest (data/content.py): caches and resumes key on it
    forget: Optional[ForgetSet] = None  # forget mode: what the renders are and how they split


def check_not_an_input(out: Path, cfg: MemmitConfig) -> None:
    """Refuse an output_dir that is, holds or lies inside a folder the run reads its model from, whatever the
    resume and overwrite flags say: writing there would replace the model being mitigated."""
    for option in ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path"):
        source = getattr(cfg, option)
        if not source or not Path(source).is_dir():
            continue  # a Hub id: nothing local to overwrite
        src, dst = Path(source).resolve(), out.resolve()
        relation = ("is" if dst == src else "lies inside" if src in dst.parents else "holds" if dst in src.parents
                    else None)
        if relation:
            raise ValueError(f"output_dir {str(out)!r} {relation} the {option} folder {source!r}: memmit never "
                             "writes where it reads the model from; choose another --output_dir")


def check_output_dir(cfg: MemmitConfig) -> None:
    """Refuse to write where the input model is, over a file, or into a folder that holds another run unless
    told to replace it (or to resume it from a checkpoint it holds)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {str(out)!r} is a file; memmit writes a folder there")
    check_not_an_input(out, cfg)
    if not out.exists() or not any(out.iterdir()) or cfg.overwrite_output_dir:
        return
    checkpoints = ckpt.list_checkpoints(out / "checkpoints")
    if cfg.resume_from_checkpoint and (checkpoints or cfg.resume_from_checkpoint != "latest"):
        return  # an explicit checkpoint is checked when it is loaded
    resumable = " or --resume_from_checkpoint latest to continue it" if checkpoints else ""
    why = " and holds no checkpoint to resume" if cfg.resume_from_checkpoint else ""
    raise ValueError(f"output_dir {str(out)!r} is not empty{why}; pass --overwrite_output_dir to replace the run "
                     f"in it{resumable}")


def make_accelerator(cfg: MemmitConfig) -> Accelerator:
    out = Path(cfg.output_dir)
    return Accelerator(mixed_precision=cfg.mixed_precision,
                       log_with=None if cfg.report_to == "none" else cfg.report_to,
                       project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))


ANCHOR_OPTIONS = ("dedup_anchors", "dedup_anchor_weight", "dedup_anchor_noisiest")  # what only anchored captions read


def with_family_defaults(cfg: MemmitConfig, task: DenoisingTask) -> MemmitConfig:
    """The config with the options whose default depends on the pipeline family filled in (a copy: the caller's
    config stays as given). This is the config the run saves and a resume compares with. Text-to-image with
    dedup keep_one anchors copied captions unless told otherwise: the default EFFICACY.md measured. Forget mode
    trains on the model's own renders, whose losses are all low: AGC would skip the retained ones, so it is off
    unless asked for; its reproductions are anchored whatever dedup_captions says."""
    forget = cfg.forget_prompts is not None
    anchor = isinstance(task, TextToImageTask) and cfg.dedup == "keep_one" and not forget
    resolved = dataclasses.replace(
        cfg, agc_lambda=(0.0 if forget else task.default_agc_lambda) if cfg.agc_lambda is None else cfg.agc_lambda,
        agc_bank_bins=task.default_agc_bank_bins if cfg.agc_bank_bins is None else cfg.agc_bank_bins,
        dedup_captions=cfg.dedup_captions or (None if forget else "anchor" if anchor else "ignore"))
    if resolved.dedup_captions != "anchor" and not forget and (given := options_given(cfg, ANCHOR_OPTIONS)):
        raise ValueError(f"{', '.join(given)}: options of anchored captions, and this run anchors none "
                         f"(dedup_captions={resolved.dedup_captions}, dedup={cfg.dedup})")
    return resolved


def load_training_data(cfg: MemmitConfig, task: DenoisingTask, detector: Detector,
                       accelerator: Accelerator) -> TrainingData:
    """The dataset, checked (the main process first, so the others find its `datasets` cache), and its split (the
    main machine's processes share the detector's work)."""
    with accelerator.main_process_first():
        dataset = load_train_dataset(cfg.dataset_name, cfg.train_data_dir, cfg.image_column, cfg.label_column,
                                     cfg.max_train_samples, cfg.dataset_config_name, extra_columns=task.extra_columns)
        check_captions(dataset, task.caption_column, cfg.image_column)
        if cfg.dedup != "none":  # an index that cannot fit the data fails before any image is read
            resolve_search(cfg.dedup_search, len(dataset))
        else:  # otherwise duplicate detection decodes (and checks) every image
            check_images(dataset, cfg.image_column, show_progress=accelerator.is_local_main_process)
        if len(dataset) < cfg.num_shards:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than num_shards={cfg.num_shards}")
    embed = task.text.caption_embeddings if isinstance(task, TextToImageTask) else None
    split = build_split(dataset, cfg, detector, accelerator.is_local_main_process, embed,
                        Workers.of(accelerator, every_machine=False))
    content = sample_digests(dataset, cfg.image_column, cfg.caption_column, accelerator.is_local_main_process)
    if cfg.caption_column is not None and hasattr(task, "use_training_captions"):
        task.use_training_captions(dataset[cfg.caption_column])  # the column alone: no image decoded
    return TrainingData(dataset, split, content)


def load_forget_data(cfg: MemmitConfig, task: TextToImageTask, prompts: list[str], anchors: Optional[dict[str, str]],
                     accelerator: Accelerator) -> TrainingData:
    """Forget mode: the pipeline's renders of its prompts as the training set, reproductions anchored. A resumed
    run trains on the set its first start wrote (memmit/forget/), not on renders made again."""
    stored = (ForgetSet.stored(Path(cfg.output_dir) / "memmit" / "forget", settings_of(cfg), prompts)
              if cfg.resume_from_checkpoint else None)
    if stored is None:
        forget = build_forget_set(cfg, task, prompts, anchors, accelerator.device, accelerator.is_local_main_process)
    else:
        logger.info(f"resuming: the forget set is the one in {cfg.output_dir}/memmit/forget (not rendered again)",
                    main_process_only=True)
        forget = stored
    dataset, row_anchors = forget.dataset(cfg.image_column, cfg.caption_column)
    split = Split(split_shards(len(dataset), cfg.num_shards, cfg.shard_strategy, cfg.seed), anchors=row_anchors)
    content = sample_digests(dataset, cfg.image_column, cfg.caption_column, accelerator.is_local_main_process)
    task.use_training_captions(dataset[cfg.caption_column])
    return TrainingData(dataset, split, content, forget)


def build_trainer(cfg: MemmitConfig, accelerator: Optional[Accelerator] = None) -> Trainer:
    """A trainer ready to `train()`, resumed from its checkpoint when cfg.resume_from_checkpoint says so."""
    check_output_dir(cfg)
    acc = accelerator or make_accelerator(cfg)
    check_mixed_precision(cfg.mixed_precision, acc.device.type)
    set_seed(cfg.seed)
    # Before anything loads: a process count the shards cannot share fails in seconds.
    group = ShardGroup(cfg.num_shards, acc.num_processes, acc.process_index, acc.device)
    if cfg.forget_prompts and cfg.caption_column is None:  # the caption column of the renders forget mode trains on
        cfg = dataclasses.replace(cfg, caption_column="text")
    task = load_task(cfg)
    forget = forget_prompts(cfg, task) if cfg.forget_prompts else None  # a bad prompt file fails before any render
    if forget:  # the reproductions' anchored samples are weighed by forget mode's own option
        task.anchor_weight = cfg.forget_anchor_weight
    check_export(task, cfg)
    if cfg.cache_latents:
        check_cache_latents(task)
    # Loaded before the data: a detector model that does not load fails in seconds.
    detector = load_detector(cfg.dedup_features, cfg.dedup_threshold, task.resolution, task.channels, acc.device,
                             search=cfg.dedup_search)
    if forget and cfg.evaluate:  # and the verification's quality extractor
        load_quality_extractor(cfg, task, acc.device)
    cfg = with_family_defaults(cfg, task)
    # The frozen parts on the device first: dedup_captions=anchor encodes captions to build the split.
    weight_dtype = WEIGHT_DTYPES.get(cfg.mixed_precision, torch.float32)
    task.prepare(acc.device, weight_dtype)
    if forget and cfg.retain_distill:  # copied before training or a resume changes the denoiser: the input's
        task.teacher = frozen_copy(task.denoiser, acc.device, weight_dtype)
    data = load_forget_data(cfg, task, *forget, acc) if forget else load_training_data(cfg, task, detector, acc)
    model = LiveModel(task.denoiser, cfg, acc.device)
    if cfg.cache_latents:  # each machine's processes encode (or find) them, each a share of the chunks
        task.inputs = cached_inputs(task, data.dataset, data.content, cfg.image_column, cfg.caption_column,
                                    cfg.random_flip, acc.device, cfg.cache_text_limit_gb,
                                    Workers.of(acc, every_machine=True), acc.is_local_main_process)
    trainer = Trainer(cfg, acc, group, task, model, data.dataset, data.split, data.content, data.forget)
    if cfg.resume_from_checkpoint:
        trainer.resume(cfg.resume_from_checkpoint)
    return trainer
