"""The memmit loop: rounds -> shard turns -> AGC steps -> aggregation, with exact checkpoints.

Each process trains the shards k with k % num_processes == process_index, one after another, on
one live UNet; everything a shard carries across rounds (optimizer moments, LR-scheduler position,
GradScaler, AGC bank, data-order RNG, EMA step) is a `ShardState` held on the CPU between turns.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .agc import LossBank, exclusion_mask, masked_mean
from .config import MemmitConfig, check_mixed_precision
from .data import ImageTransform, check_captions, check_images, iter_images, load_train_dataset, source_names, split_shards
from .dedup import cluster_report, find_duplicate_clusters, keep_one, split_with_clusters
from .ensemble import FlatAverage, floating_tensors, shard_weights
from .hub import check_hub_settings, create_repo_early, push, write_model_card
from .lora import add_lora, add_merged, is_lora_key, plain_state_dict, reset_adapters, svd_lora
from .tasks import load_task

logger = get_logger(__name__)

DEDUP_RESOLUTION = 32  # duplicates are found on small crops: cheap, and blind to resampling noise


class ShardStream:
    """A shard's data order: a fresh seeded permutation each epoch; batches never cross epochs."""

    def __init__(self, ids: list[int], seed: int):
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)
        self.order = self.ids[torch.randperm(len(self.ids), generator=self.generator)]
        self.cursor = 0

    def next_batch(self, batch_size: int) -> list[int]:
        if self.cursor >= len(self.order):
            self.order = self.ids[torch.randperm(len(self.ids), generator=self.generator)]
            self.cursor = 0
        batch = self.order[self.cursor:self.cursor + batch_size]
        self.cursor += len(batch)
        return batch.tolist()

    def drop(self, ids: list[int]) -> None:
        """Leave `ids` out from now on: in the rest of this epoch and in every later one."""
        gone = torch.tensor(ids, dtype=torch.long)
        self.ids = self.ids[~torch.isin(self.ids, gone)]
        rest = self.order[self.cursor:]
        self.order = torch.cat([self.order[:self.cursor], rest[~torch.isin(rest, gone)]])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "ids": self.ids.clone(), "order": self.order.clone(),
                "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.ids, self.order, self.cursor = state["ids"].clone(), state["order"].clone(), state["cursor"]


@dataclass
class ShardState:
    """Everything of one shard that persists across rounds; only the weights restart from θ̄."""

    index: int
    ids: list[int]
    stream: ShardStream
    bank: LossBank
    optimizer: Optional[dict] = None
    lr_scheduler: Optional[dict] = None
    scaler: Optional[dict] = None
    ema_step: int = 0

    def state_dict(self) -> dict:
        return {"index": self.index, "stream": self.stream.state_dict(), "bank": self.bank.state_dict(),
                "optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler, "scaler": self.scaler,
                "ema_step": self.ema_step}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.bank.load_state_dict(state["bank"])
        self.optimizer, self.lr_scheduler = state["optimizer"], state["lr_scheduler"]
        self.scaler, self.ema_step = state["scaler"], state["ema_step"]


def micro_batches_per_turn(cfg: MemmitConfig, shard_size: int) -> int:
    if cfg.local_steps is not None:
        return cfg.local_steps * cfg.gradient_accumulation_steps
    return cfg.local_epochs * math.ceil(shard_size / cfg.train_batch_size)


def windows_per_turn(cfg: MemmitConfig, shard_size: int) -> int:
    """Optimizer-step windows in one turn (the last one may hold fewer micro-batches)."""
    return math.ceil(micro_batches_per_turn(cfg, shard_size) / cfg.gradient_accumulation_steps)


def _to_cpu(obj):
    """Deep copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def adamw_class(use_8bit: bool) -> type:
    """torch's AdamW, or bitsandbytes' 8-bit AdamW when asked for (a clear error if it is missing)."""
    if not use_8bit:
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ValueError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from exc
    return bnb.optim.AdamW8bit


def check_output_dir(cfg: MemmitConfig) -> None:
    """Refuse to write into a directory that holds another run, unless told to."""
    out = Path(cfg.output_dir)
    if cfg.resume_from_checkpoint or not out.exists() or not any(out.iterdir()):
        return
    if not cfg.overwrite_output_dir:
        raise ValueError(f"output_dir {str(out)!r} is not empty; pass --overwrite_output_dir to replace it "
                         "or --resume_from_checkpoint latest to continue it")


class Trainer:
    def __init__(self, cfg: MemmitConfig, accelerator: Optional[Accelerator] = None):
        self.cfg = cfg
        check_output_dir(cfg)
        self.out = Path(cfg.output_dir)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        acc = self.accelerator
        check_mixed_precision(cfg.mixed_precision, acc.device.type)
        set_seed(cfg.seed)
        self.repo_id = check_hub_settings(cfg.push_to_hub, cfg.hub_model_id, cfg.output_dir)

        self.task = load_task(cfg)
        if cfg.agc_lambda is None:
            cfg.agc_lambda = self.task.default_agc_lambda
        with acc.main_process_first():
            self.dataset = load_train_dataset(cfg.dataset_name, cfg.train_data_dir, cfg.image_column,
                                              cfg.label_column, cfg.max_train_samples, cfg.dataset_config_name,
                                              extra_columns=self.task.extra_columns)
            check_captions(self.dataset, self.task.caption_column, cfg.image_column)
            if cfg.dedup == "none":  # otherwise duplicate detection decodes (and checks) every image
                check_images(self.dataset, cfg.image_column, show_progress=acc.is_local_main_process)
        n = len(self.dataset)
        if cfg.caption_column is not None and hasattr(self.task, "set_default_prompts"):
            # The round-end grid renders a few training captions unless validation_prompts are given;
            # selecting the column reads only the captions, not the images.
            self.task.set_default_prompts(self.dataset.select(range(min(n, 16)))[cfg.caption_column])
        if n < cfg.num_shards:
            raise ValueError(f"the dataset has {n} samples, fewer than num_shards={cfg.num_shards}")
        if cfg.num_shards < acc.num_processes:
            raise ValueError(f"num_shards={cfg.num_shards} is smaller than the {acc.num_processes} processes: each "
                             f"process trains whole shards, so pass --num_shards {acc.num_processes} (or a multiple)")
        self.duplicates = None
        self.shards = self._split(n)
        self.weights = shard_weights([len(s) for s in self.shards], cfg.aggregation)
        self.my_shards = [k for k in range(cfg.num_shards) if k % acc.num_processes == acc.process_index]
        # Every process walks the same turn slots, so turn-boundary collectives line up; a process
        # with fewer shards idles through its last slot.
        self.turns_per_round = math.ceil(cfg.num_shards / acc.num_processes)
        if cfg.num_shards % acc.num_processes:
            idle = acc.num_processes - cfg.num_shards % acc.num_processes
            logger.warning(f"num_shards={cfg.num_shards} is not a multiple of the {acc.num_processes} processes: "
                           f"{idle} process(es) idle for 1 of {self.turns_per_round} turns every round "
                           f"(~{100 / self.turns_per_round:.0f}% of their time)", main_process_only=True)

        self._prepare_unet()
        self.states = {k: ShardState(k, self.shards[k], ShardStream(self.shards[k], cfg.seed + 1000 + k),
                                     LossBank(self.task.num_train_timesteps, cfg.agc_bank_decay, cfg.agc_bank_init,
                                              cfg.agc_bank_bins))
                       for k in self.my_shards}
        self.seen = np.zeros(n, dtype=np.int64)
        self.skipped = np.zeros(n, dtype=np.int64)
        # sample id -> when agc_exclusion left it out: {"round", "seen", "skipped"}; the same on every process.
        self.excluded: dict[int, dict] = {}
        self.global_step = 0
        self.last_checkpoint_step = 0
        self.position = {"round": 0, "turn": 0, "window": 0}
        # Every input is valid: a bad token or repo name fails now, in seconds, not after training.
        if self.repo_id and acc.is_main_process:
            self.repo_id = create_repo_early(self.repo_id, cfg.hub_token, cfg.hub_private_repo)

    def _prepare_unet(self) -> None:
        """The live UNet (fp32, adapters if LoRA), θ̄ over its base weights, the optimizer class."""
        cfg, acc = self.cfg, self.accelerator
        # The trained UNet stays fp32 (autocast handles mixed precision), even from an fp16 variant.
        self.unet = self.task.unet.to(acc.device)
        if self.unet.dtype != torch.float32:
            self.unet.float()
        self.task.prepare(acc.device, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32))
        self.unet.train()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.optimizer_class = adamw_class(cfg.use_8bit_adam)
        self.lora = cfg.lora_rank is not None
        if cfg.export == "lora":
            self.pretrained_plain = {k: v.detach().cpu().clone() for k, v in self.unet.state_dict().items()}
            if not hasattr(type(self.task.pipeline), "save_lora_weights"):
                raise ValueError(f"--export lora needs a pipeline that loads LoRA weights; "
                                 f"{type(self.task.pipeline).__name__} does not")
        if self.lora:
            add_lora(self.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        # live: everything a mid-turn checkpoint restores; base: what θ̄ averages (adapters excluded).
        self.live = floating_tensors(self.unet)
        self.base = [t for name, t in self.unet.state_dict(keep_vars=True).items()
                     if t.is_floating_point() and not is_lora_key(name)]
        self.theta = FlatAverage(self.base)
        self.ema_avg = FlatAverage(self.params) if cfg.use_ema else None

    def _split(self, n: int) -> list[list[int]]:
        """The fixed shard split, after near-duplicate handling when asked for."""
        cfg = self.cfg
        labels = self.dataset[cfg.label_column] if cfg.shard_strategy == "stratified" else None
        if cfg.dedup == "none":
            return split_shards(n, cfg.num_shards, cfg.shard_strategy, cfg.seed, labels)
        clusters = self._duplicate_clusters()
        if cfg.dedup == "same_shard":
            return split_with_clusters(n, cfg.num_shards, clusters, cfg.shard_strategy, cfg.seed)
        kept = keep_one(n, clusters)
        local = split_shards(len(kept), cfg.num_shards, cfg.shard_strategy, cfg.seed,
                             [labels[i] for i in kept] if labels is not None else None)
        return [[kept[j] for j in shard] for shard in local]

    def _duplicate_clusters(self) -> list[list[int]]:
        """Exact and near-duplicate clusters, found on small center crops; reported in memmit/duplicates.json."""
        size = min(self.task.resolution, DEDUP_RESOLUTION)
        transform = ImageTransform(size, self.task.channels, center_crop=True)
        images = torch.stack([transform(img).flatten() for img in iter_images(
            self.dataset, self.cfg.image_column, "finding duplicates", self.accelerator.is_local_main_process)])
        clusters = find_duplicate_clusters(images, self.cfg.dedup_threshold)
        self.duplicates = cluster_report(clusters, source_names(self.dataset, self.cfg.image_column))
        logger.info("%d duplicate clusters holding %d samples (dedup=%s)", self.duplicates["num_clusters"],
                    self.duplicates["num_samples_in_clusters"], self.cfg.dedup, main_process_only=True)
        return clusters

    # ---- one shard turn -------------------------------------------------------------------
    def _make_optimizer(self, state: ShardState):
        cfg = self.cfg
        optimizer = self.optimizer_class(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                         weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        total = cfg.num_rounds * windows_per_turn(cfg, len(state.ids))
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                  num_training_steps=total)
        scaler = torch.amp.GradScaler(self.accelerator.device.type,
                                      enabled=cfg.mixed_precision == "fp16" and self.accelerator.device.type == "cuda")
        # LoRA adapters restart every turn and their optimizer state with them (state.optimizer is
        # then None, except when resuming mid-turn); the schedule always goes on.
        if state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
        if state.lr_scheduler is not None:
            scheduler.load_state_dict(state.lr_scheduler)
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
            scaler.load_state_dict(state.scaler)
        return optimizer, scheduler, scaler

    def _make_ema(self, state: ShardState) -> Optional[EMAModel]:
        if self.ema_avg is None:
            return None
        ema = EMAModel(self.params, decay=self.cfg.ema_decay)
        self.ema_avg.load_into(ema.shadow_params)
        ema.optimization_step = state.ema_step
        return ema

    def _train_window(self, state: ShardState, optimizer, scheduler, scaler, ema, n_micro: int) -> dict:
        """One optimizer step's worth of micro-batches with the AGC mask; returns log values."""
        cfg, acc = self.cfg, self.accelerator
        gen = state.stream.generator
        kept_total, seen_total, losses_logged = 0, 0, []
        for _ in range(n_micro):
            ids = state.stream.next_batch(cfg.train_batch_size)
            batch = self.task.batch(self.dataset[ids], gen)
            with acc.autocast():
                out = self.task.per_sample_loss(self.unet, batch, gen, acc.device)
            keep = state.bank.keep_mask(out.losses, out.timesteps, cfg.agc_lambda)
            state.bank.update(out.losses, out.timesteps)
            self.seen[ids] += 1
            self.skipped[np.asarray(ids)[~keep.numpy()]] += 1
            seen_total += len(ids)
            if keep.any():
                loss = masked_mean(out.losses, keep, out.weights) / n_micro
                scaler.scale(loss).backward()
                kept_total += int(keep.sum())
                losses_logged.append(loss.item() * n_micro)
        if kept_total:
            if cfg.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.step(self.params)
        # No kept sample: no optimizer step (the schedule still advances with the data).
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        return {"loss": float(np.mean(losses_logged)) if losses_logged else float("nan"),
                "skip_fraction": 1 - kept_total / seen_total, "lr": lr}

    def _turn(self, rnd: int, turn: int, start_window: int, bar) -> None:
        cfg = self.cfg
        k = self.my_shards[turn]
        state = self.states[k]
        if start_window == 0:
            self.theta.load_into(self.base)
            if self.lora:
                reset_adapters(self.unet, seed=self.cfg.seed + 7919 * rnd + k)
        optimizer, scheduler, scaler = self._make_optimizer(state)
        ema = self._make_ema(state)
        if start_window and ema is not None and self._resumed_ema is not None:
            for p, s in zip(ema.shadow_params, self._resumed_ema):
                p.data.copy_(s)
            self._resumed_ema = None
        n_micro_total = micro_batches_per_turn(cfg, len(state.ids))
        n_windows = windows_per_turn(cfg, len(state.ids))
        for w in range(start_window, n_windows):
            n_micro = min(cfg.gradient_accumulation_steps, n_micro_total - w * cfg.gradient_accumulation_steps)
            logs = self._train_window(state, optimizer, scheduler, scaler, ema, n_micro)
            self.global_step += 1
            self.position = {"round": rnd, "turn": turn, "window": w + 1}
            bar.update(1)
            bar.set_postfix(round=rnd, shard=k, loss=f"{logs['loss']:.4f}", skip=f"{100 * logs['skip_fraction']:.0f}%")
            self.accelerator.log({f"shard_{k}/{name}": v for name, v in logs.items()}, step=self.global_step)
            # Mid-turn checkpoints need no agreement between processes only when there is one.
            if self.accelerator.num_processes == 1 and self._checkpoint_due() and w + 1 < n_windows:
                self.save_checkpoint(live=(state, optimizer, scheduler, scaler, ema))
        state.optimizer = None if self.lora else _to_cpu(optimizer.state_dict())
        state.lr_scheduler, state.scaler = scheduler.state_dict(), scaler.state_dict()
        if ema is not None:
            state.ema_step = ema.optimization_step
            self.ema_avg.add(ema.shadow_params, self.weights[k])
        if self.lora:
            add_merged(self.theta, self.unet, self.base, self.weights[k])
        else:
            self.theta.add(self.base, self.weights[k])

    def _checkpoint_due(self, collective: bool = False) -> bool:
        """checkpointing_steps optimizer steps since the last checkpoint (on any process, if collective)."""
        n = self.cfg.checkpointing_steps
        due = bool(n) and self.global_step - self.last_checkpoint_step >= n
        if collective and self.accelerator.num_processes > 1:
            flag = torch.tensor([int(due)], device=self.accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            due = bool(flag.item())
        return due

    # ---- the run --------------------------------------------------------------------------
    def _all_reduce(self):
        if self.accelerator.num_processes == 1:
            return None
        return lambda t: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)

    def train(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        self._resumed_ema = None
        self._prepare_output()
        if cfg.resume_from_checkpoint:
            self.load_checkpoint(cfg.resume_from_checkpoint)
        if acc.is_main_process:
            acc.init_trackers("memmit", config={k: v for k, v in cfg.to_dict().items()
                                                if isinstance(v, (int, float, str, bool))})
        per_round = sum(windows_per_turn(cfg, len(self.shards[k])) for k in self.my_shards)
        bar = tqdm(total=per_round * cfg.num_rounds, initial=self.global_step, desc="memmit",
                   disable=not acc.is_local_main_process)
        start = dict(self.position)
        for rnd in range(start["round"], cfg.num_rounds):
            first_turn = start["turn"] if rnd == start["round"] else 0
            for turn in range(first_turn, self.turns_per_round):
                if turn < len(self.my_shards):
                    resumed_mid_turn = rnd == start["round"] and turn == start["turn"]
                    self._turn(rnd, turn, start["window"] if resumed_mid_turn else 0, bar)
                self.position = {"round": rnd, "turn": turn + 1, "window": 0}
                # The round's last turn is covered by the round-end checkpoint.
                if turn + 1 < self.turns_per_round and self._checkpoint_due(collective=True):
                    self.save_checkpoint(live=None)
            self.theta.finish_round(self._all_reduce())
            if self.ema_avg is not None:
                self.ema_avg.finish_round(self._all_reduce())
            if cfg.agc_exclusion is not None:
                self._exclude(rnd)
            self.position = {"round": rnd + 1, "turn": 0, "window": 0}
            self.save_checkpoint(live=None)
            self._log_samples(rnd)
        bar.close()
        return self.export()

    def _exclude(self, rnd: int) -> None:
        """--agc_exclusion: samples AGC keeps skipping leave every later round. Decided on the counts of all
        processes, so every process records the same set; each drops them from its own shards' streams.
        The split, the shard weights and the step budget stay as they were."""
        cfg = self.cfg
        seen, skipped = self._gather_counts()
        flagged = exclusion_mask(seen, skipped, cfg.agc_exclusion, cfg.agc_exclusion_min_visits)
        for k, ids in enumerate(self.shards):
            active = [i for i in ids if i not in self.excluded]
            drop = [i for i in active if flagged[i]]
            if drop and len(drop) == len(active):
                logger.warning(f"round {rnd}: agc_exclusion would empty shard {k}; its {len(drop)} samples stay",
                               main_process_only=True)
                continue
            for i in drop:
                self.excluded[i] = {"round": rnd, "seen": int(seen[i]), "skipped": int(skipped[i])}
            if drop and k in self.states:
                self.states[k].stream.drop(drop)
        if self.accelerator.is_main_process:
            (self.out / "memmit" / "excluded.json").write_text(json.dumps(self.excluded, indent=2))

    def _load_result(self) -> None:
        """θ̄ (or the averaged EMA) into the live UNet, adapters zeroed."""
        self.theta.load_into(self.base)
        if self.lora:
            reset_adapters(self.unet, seed=self.cfg.seed)
        if self.ema_avg is not None:
            self.ema_avg.load_into(self.params)

    def _log_samples(self, rnd: int) -> None:
        cfg, acc = self.cfg, self.accelerator
        if not cfg.num_validation_images or cfg.report_to != "tensorboard" or not acc.is_main_process:
            return
        self._load_result()
        self.unet.eval()
        images = self.task.sample(self.unet, cfg.num_validation_images, cfg.validation_inference_steps,
                                  torch.Generator().manual_seed(cfg.seed))
        self.unet.train()
        acc.get_tracker("tensorboard", unwrap=True).add_images("samples", images, rnd + 1)

    # ---- output -----------------------------------------------------------------------------
    def _prepare_output(self) -> None:
        if not self.accelerator.is_main_process:
            return
        if self.cfg.overwrite_output_dir and not self.cfg.resume_from_checkpoint:
            # Stale checkpoints or a stale pipeline must not pass for this run's.
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
            (self.out / "model_index.json").unlink(missing_ok=True)
        meta = self.out / "memmit"
        meta.mkdir(parents=True, exist_ok=True)
        self.cfg.save(meta / "config.yaml")
        (meta / "shards.json").write_text(json.dumps({str(k): s for k, s in enumerate(self.shards)}))
        if self.duplicates is not None:
            (meta / "duplicates.json").write_text(json.dumps(self.duplicates, indent=2))

    def _gather_counts(self) -> tuple[np.ndarray, np.ndarray]:
        if self.accelerator.num_processes == 1:
            return self.seen, self.skipped
        both = torch.from_numpy(np.stack([self.seen, self.skipped])).to(self.accelerator.device)
        torch.distributed.all_reduce(both)
        both = both.cpu().numpy()
        return both[0], both[1]

    def write_candidates(self, path: Path) -> None:
        """Samples ranked by how often AGC skipped them: the memorization candidates."""
        seen, skipped = self._gather_counts()
        if not self.accelerator.is_main_process:
            return
        names = source_names(self.dataset, self.cfg.image_column)
        shard_of = {i: k for k, ids in enumerate(self.shards) for i in ids}
        frac = np.where(seen > 0, skipped / np.maximum(seen, 1), 0.0)
        order = sorted(range(len(seen)), key=lambda i: (-frac[i], -skipped[i], i))
        lines = ["rank,sample_id,seen,skipped,skip_fraction,shard,excluded_after_round,source"]
        for rank, i in enumerate(order, 1):
            source = names[i].replace('"', '""')
            shard = shard_of.get(i, "duplicate")  # dedup=keep_one leaves extra copies out of training
            excluded = self.excluded[i]["round"] if i in self.excluded else ""
            lines.append(f'{rank},{i},{seen[i]},{skipped[i]},{frac[i]:.4f},{shard},{excluded},"{source}"')
        path.write_text("\n".join(lines) + "\n")

    def export(self) -> Path:
        acc = self.accelerator
        self.write_candidates(self.out / "memmit" / "candidates.csv")
        if acc.is_main_process:
            self._load_result()
            unet = self._plain_unet()
            if self.cfg.export == "lora":
                self._export_lora(unet)
            else:
                self.task.save_pipeline(unet, self.out)
            cfg = self.cfg
            write_model_card(self.out, cfg.to_dict(), cfg.pretrained_model_name_or_path,
                             cfg.dataset_name or cfg.train_data_dir, repo_id=self.repo_id)
        acc.wait_for_everyone()
        acc.end_training()
        if self.repo_id and acc.is_main_process:
            url = push(self.out, self.repo_id, self.cfg.hub_token, self.cfg.hub_private_repo)
            print(f"memmit: pushed to {url}")
        return self.out

    def _plain_unet(self) -> torch.nn.Module:
        """The result as a UNet of the pipeline's own class, without adapter layers."""
        if not self.lora:
            return self.unet
        plain = type(self.unet).from_config(self.unet.config)
        plain.load_state_dict(plain_state_dict(self.unet))
        return plain

    def _export_lora(self, unet: torch.nn.Module) -> None:
        """One LoRA of the whole change (final - pretrained) in the target modules, by truncated SVD."""
        cfg = self.cfg
        final = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
        def targeted(name: str) -> bool:
            module = name.removesuffix(".weight")
            return name.endswith(".weight") and any(module == t or module.endswith("." + t)
                                                    for t in cfg.lora_target_modules)
        deltas = {k: final[k].float() - self.pretrained_plain[k].float() for k in final
                  if final[k].is_floating_point()}
        lora_state, error = svd_lora({k: d for k, d in deltas.items() if targeted(k)}, cfg.export_lora_rank)
        total = sum(float(d.pow(2).sum()) for d in deltas.values())
        outside = sum(float(d.pow(2).sum()) for k, d in deltas.items() if not targeted(k))
        type(self.task.pipeline).save_lora_weights(self.out, unet_lora_layers=lora_state, safe_serialization=True)
        summary = {"export_lora_rank": cfg.export_lora_rank, "relative_svd_error": error,
                   "change_outside_targets": (outside / total) ** 0.5 if total > 0 else 0.0,
                   "target_modules": cfg.lora_target_modules}
        (self.out / "memmit" / "lora_export.json").write_text(json.dumps(summary, indent=2))
        print(f"memmit: LoRA export rank {cfg.export_lora_rank}: relative SVD error {error:.2e}; "
              f"share of the change outside {cfg.lora_target_modules}: {summary['change_outside_targets']:.2e}")

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, live) -> None:
        """Everything needed to continue exactly; `live` is the running shard's (state, opt, sched, scaler, ema)."""
        states = {k: s.state_dict() for k, s in self.states.items()}
        process_state = {"shards": states, "global_step": self.global_step, "seen": torch.from_numpy(self.seen.copy()),
                         "skipped": torch.from_numpy(self.skipped.copy()),
                         "torch_rng": torch.get_rng_state()}
        if live is not None:
            state, optimizer, scheduler, scaler, ema = live
            process_state["shards"][state.index].update(
                optimizer=optimizer.state_dict(), lr_scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                ema_step=ema.optimization_step if ema is not None else state.ema_step)
            process_state["live_weights"] = [t.detach().cpu() for t in self.live]
            if ema is not None:
                process_state["live_ema"] = [t.detach().cpu() for t in ema.shadow_params]
        shared = {"theta": self.theta.state_dict(), "position": self.position,
                  "ema": self.ema_avg.state_dict() if self.ema_avg is not None else None, "shards": self.shards,
                  "excluded": self.excluded}
        ckpt.save(self.accelerator, self.out / "checkpoints", self.global_step, shared, process_state,
                  self.cfg.checkpoints_total_limit)
        self.last_checkpoint_step = self.global_step

    def load_checkpoint(self, which: str) -> None:
        path = ckpt.resolve(self.out / "checkpoints", which)
        if path is None:
            logger.info("no checkpoint found in %s; starting a new run", self.out / "checkpoints", main_process_only=True)
            return
        shared, process_state = ckpt.load(self.accelerator, path)
        if shared["shards"] != self.shards:
            raise ValueError(f"checkpoint {path} was made with another shard split (num_shards, seed, "
                             "shard_strategy or data changed); resume needs the same settings")
        self.theta.load_state_dict(shared["theta"])
        if self.ema_avg is not None:
            self.ema_avg.load_state_dict(shared["ema"])
        self.position, self.global_step = shared["position"], process_state["global_step"]
        self.excluded = shared["excluded"]
        self.last_checkpoint_step = self.global_step
        for k, s in process_state["shards"].items():
            self.states[k].load_state_dict(s)
        self.seen[:], self.skipped[:] = process_state["seen"].numpy(), process_state["skipped"].numpy()
        torch.set_rng_state(process_state["torch_rng"])
        if "live_weights" in process_state:
            with torch.no_grad():
                for t, src in zip(self.live, process_state["live_weights"]):
                    t.copy_(src)
        self._resumed_ema = process_state.get("live_ema")
        logger.info("resumed from %s at %s", path, self.position, main_process_only=True)


def train(cfg: MemmitConfig) -> Path:
    """Run memmit end to end and return the output directory holding the merged pipeline."""
    return Trainer(cfg).train()
