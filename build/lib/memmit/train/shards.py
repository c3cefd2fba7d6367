"""A shard: its data stream, what it carries across rounds, and its live optimizer state during a turn.

One process trains its shards one after another on one live model. Between turns a shard's optimizer
moments, LR-scheduler position, GradScaler and EMA step wait on the CPU; `open` builds the live
objects from them at the start of a turn and `close` puts them back at its end (docs/method.md).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from .agc import LossBank
from ..config import MemmitConfig
from ..draws import keyed_generator
from .ensemble import FlatAverage


@dataclass(frozen=True)
class MicroBatch:
    """Sample ids of one micro-batch of a shard, with their key: the epoch and each one's position in that
    epoch's order. Sample i's random draws come from generators keyed by (seed, shard, epoch, position)."""

    shard: int
    epoch: int
    ids: tuple[int, ...]
    positions: tuple[int, ...]

    def generators(self, seed: int, stream: int) -> list[torch.Generator]:
        """Each sample's generator of one of its streams (draws.DATA or draws.NOISE)."""
        return [keyed_generator(seed, self.shard, self.epoch, position, stream) for position in self.positions]

    def part(self, index: int, size: int) -> "MicroBatch":
        """Member `index`'s share of a shard group's micro-batch: `size` samples (fewer, or none, at an epoch's end)."""
        cut = slice(index * size, (index + 1) * size)
        return MicroBatch(self.shard, self.epoch, self.ids[cut], self.positions[cut])


class ShardStream:
    """A shard's data order: a fresh seeded permutation each epoch; batches never cross epochs."""

    def __init__(self, ids: list[int], seed: int, shard: int):
        self.shard = shard
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)
        self.order = self.ids[torch.randperm(len(self.ids), generator=self.generator)]
        self.epoch, self.cursor = 0, 0

    def next_batch(self, batch_size: int) -> MicroBatch:
        if self.cursor >= len(self.order):
            self.order = self.ids[torch.randperm(len(self.ids), generator=self.generator)]
            self.epoch, self.cursor = self.epoch + 1, 0
        batch = self.order[self.cursor:self.cursor + batch_size]
        positions = tuple(range(self.cursor, self.cursor + len(batch)))
        self.cursor += len(batch)
        return MicroBatch(self.shard, self.epoch, tuple(batch.tolist()), positions)

    def peek(self, count: int, batch_size: int) -> list[MicroBatch]:
        """The next `count` micro-batches, leaving this stream where it is (what data-loading workers prepare)."""
        twin = ShardStream([], 0, self.shard)
        twin.load_state_dict(self.state_dict())
        return [twin.next_batch(batch_size) for _ in range(count)]

    def drop(self, ids: list[int]) -> None:
        """Leave `ids` out from now on: in the rest of this epoch and in every later one."""
        gone = torch.tensor(ids, dtype=torch.long)
        self.ids = self.ids[~torch.isin(self.ids, gone)]
        rest = self.order[self.cursor:]
        self.order = torch.cat([self.order[:self.cursor], rest[~torch.isin(rest, gone)]])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "ids": self.ids.clone(), "order": self.order.clone(),
                "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if "epoch" not in state:
            raise ValueError("the checkpoint was written by an older memmit, whose random draws were not per sample; "
                             "start a new run (without --resume_from_checkpoint)")
        self.generator.set_state(state["generator"])
        self.ids, self.order = state["ids"].clone(), state["order"].clone()
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def micro_batches_per_turn(cfg: MemmitConfig, shard_size: int, batch_size: int) -> int:
    """`batch_size`: a micro-batch of the whole shard group (train_batch_size x the processes training the shard)."""
    if cfg.local_steps is not None:
        return cfg.local_steps * cfg.gradient_accumulation_steps
    return cfg.local_epochs * math.ceil(shard_size / batch_size)


def windows_per_turn(cfg: MemmitConfig, shard_size: int, batch_size: int) -> int:
    """Optimizer-step windows in one turn (the last one may hold fewer micro-batches)."""
    return math.ceil(micro_batches_per_turn(cfg, shard_size, batch_size) / cfg.gradient_accumulation_steps)


def micro_batches_in_window(cfg: MemmitConfig, shard_size: int, batch_size: int, window: int) -> int:
    return min(cfg.gradient_accumulation_steps,
               micro_batches_per_turn(cfg, shard_size, batch_size) - window * cfg.gradient_accumulation_steps)


def to_cpu(obj):
    """Deep copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
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


class Shard:
    """One shard's ids, stream, loss bank and persistent optimizer state; live objects while it trains.
    `batch_size`: its micro-batch, over every process of its shard group.

    `restart_optimizer` (LoRA): the adapters restart every turn, so their optimizer moments do too;
    the schedule always goes on.
    """

    def __init__(self, index: int, ids: list[int], cfg: MemmitConfig, num_timesteps: int, device: torch.device,
                 batch_size: int, restart_optimizer: bool = False):
        self.index, self.ids, self.cfg, self.device, self.batch_size = index, ids, cfg, device, batch_size
        self.stream = ShardStream(ids, cfg.seed + 1000 + index, index)
        self.bank = LossBank(num_timesteps, cfg.agc_bank_decay, cfg.agc_bank_init, cfg.agc_bank_bins)
        self.restart_optimizer = restart_optimizer
        self.optimizer_class = adamw_class(cfg.use_8bit_adam)
        # The closed form of the live objects; "ema" holds shadow weights only for a turn saved mid-way.
        self.saved: dict = {"optimizer": None, "lr_scheduler": None, "scaler": None, "ema_step": 0, "ema": None}
        self.optimizer = self.lr_scheduler = self.scaler = self.ema = None

    @property
    def windows(self) -> int:
        return windows_per_turn(self.cfg, len(self.ids), self.batch_size)

    @property
    def is_open(self) -> bool:
        return self.optimizer is not None

    def open(self, params: Sequence[torch.nn.Parameter], ema_start: Optional[FlatAverage]) -> None:
        """Live optimizer, schedule, scaler (and EMA, started from `ema_start` unless resumed mid-turn)."""
        cfg = self.cfg
        self.optimizer = self.optimizer_class(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                              weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.num_rounds * self.windows)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.mixed_precision == "fp16")  # CUDA only (checked)
        saved = self.saved
        if saved["optimizer"] is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
        if saved["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
            for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr
            self.scaler.load_state_dict(saved["scaler"])
        if ema_start is not None:
            self.ema = EMAModel(params, decay=cfg.ema_decay)
            if saved["ema"] is not None:
                for p, s in zip(self.ema.shadow_params, saved["ema"]):
                    p.data.copy_(s)
            else:
                ema_start.load_into(self.ema.shadow_params)
            self.ema.optimization_step = saved["ema_step"]

    def close(self) -> None:
        """Back to the CPU: what the next round's turn continues from."""
        self.saved = self._live_state(keep_optimizer=not self.restart_optimizer, keep_ema_weights=False)
        self.optimizer = self.lr_scheduler = self.scaler = self.ema = None

    def _live_state(self, keep_optimizer: bool, keep_ema_weights: bool) -> dict:
        return {"optimizer": to_cpu(self.optimizer.state_dict()) if keep_optimizer else None,
                "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema_step": self.ema.optimization_step if self.ema is not None else self.saved["ema_step"],
                "ema": [to_cpu(p) for p in self.ema.shadow_params] if keep_ema_weights and self.ema is not None else None}

    def state_dict(self) -> dict:
        """Everything to continue this shard exactly, whether it is between turns or in the middle of one."""
        saved = self._live_state(keep_optimizer=True, keep_ema_weights=True) if self.is_open else self.saved
        return {"stream": self.stream.state_dict(), "bank": self.bank.state_dict(), **saved}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.bank.load_state_dict(state["bank"])
        self.saved = {k: state[k] for k in ("optimizer", "lr_scheduler", "scaler", "ema_step", "ema")}
