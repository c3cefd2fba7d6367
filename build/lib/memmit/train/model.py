"""The live model every shard of a process trains in turn, the global average θ̄ over it, and the result.

The trained denoiser stays fp32 (autocast handles mixed precision), even from an fp16 variant. With LoRA
the base weights are frozen and θ̄ averages them with each shard's adapters merged in (lora.py).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from ..config import MemmitConfig
from .ensemble import FlatAverage, floating_tensors
from .lora import add_lora, add_merged, is_lora_key, plain_state_dict, reset_adapters


class LiveModel:
    def __init__(self, denoiser: torch.nn.Module, cfg: MemmitConfig, device: torch.device):
        self.cfg = cfg
        self.denoiser = denoiser.to(device)
        if self.denoiser.dtype != torch.float32:
            self.denoiser.float()
        self.denoiser.train()
        if cfg.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.lora = cfg.lora_rank is not None
        # The pretrained weights, for --export lora's difference; kept before any adapter exists.
        self.pretrained = ({k: v.detach().cpu().clone() for k, v in self.denoiser.state_dict().items()}
                           if cfg.export == "lora" else None)
        if self.lora:
            add_lora(self.denoiser, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
        self.params = [p for p in self.denoiser.parameters() if p.requires_grad]
        # live: everything a mid-turn checkpoint restores; base: what θ̄ averages (adapters excluded).
        self.live = floating_tensors(self.denoiser)
        self.base = [t for name, t in self.denoiser.state_dict(keep_vars=True).items()
                     if t.is_floating_point() and not is_lora_key(name)]
        self.theta = FlatAverage(self.base)
        self.ema_average = FlatAverage(self.params) if cfg.use_ema else None

    def start_turn(self, rnd: int, shard: int) -> None:
        """θ_k <- θ̄ (fresh, seeded adapters with LoRA)."""
        self.theta.load_into(self.base)
        if self.lora:
            reset_adapters(self.denoiser, seed=self.cfg.seed + 7919 * rnd + shard)

    def add_to_average(self, weight: float, ema_shadow: Optional[list[torch.Tensor]] = None) -> None:
        """accumulator += w_k θ_k (and w_k EMA_k)."""
        if self.lora:
            add_merged(self.theta, self.denoiser, self.base, weight)
        else:
            self.theta.add(self.base, weight)
        if ema_shadow is not None:
            self.ema_average.add(ema_shadow, weight)

    def finish_round(self, reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        """θ̄ <- the round's weighted sum (over every process's shards, through `reduce_sum`)."""
        self.theta.finish_round(reduce_sum)
        if self.ema_average is not None:
            self.ema_average.finish_round(reduce_sum)

    def load_result(self) -> None:
        """θ̄ (or the averaged EMA) into the live denoiser, adapters zeroed."""
        self.theta.load_into(self.base)
        if self.lora:
            reset_adapters(self.denoiser, seed=self.cfg.seed)
        if self.ema_average is not None:
            self.ema_average.load_into(self.params)

    def result(self) -> torch.nn.Module:
        """The result as a denoiser of the pipeline's own class, without adapter layers."""
        self.load_result()
        if not self.lora:
            return self.denoiser
        plain = type(self.denoiser).from_config(self.denoiser.config)
        plain.load_state_dict(plain_state_dict(self.denoiser))
        return plain

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[torch.nn.Module]:
        """The denoiser in eval mode for sampling, back in train mode even if sampling raises."""
        self.denoiser.eval()
        try:
            yield self.denoiser
        finally:
            self.denoiser.train()

    def live_state(self) -> list[torch.Tensor]:
        return [t.detach().cpu() for t in self.live]

    @torch.no_grad()
    def load_live_state(self, tensors: list[torch.Tensor]) -> None:
        for t, src in zip(self.live, tensors):
            t.copy_(src)

    def state_dict(self, part: str) -> dict:
        """One part (FlatAverage.state_dict) of θ̄ and of the EMA's average."""
        return {"theta": self.theta.state_dict(part),
                "ema": self.ema_average.state_dict(part) if self.ema_average is not None else None}

    def load_state_dict(self, part: str, state: dict) -> None:
        self.theta.load_state_dict(part, state["theta"])
        if self.ema_average is not None:
            self.ema_average.load_state_dict(part, state["ema"])
