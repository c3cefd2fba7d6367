"""Anti-Gradient Control: the per-timestep loss bank and the keep mask (docs/method.md).

Pure torch and numpy; no accelerate, no I/O, so the rule can be tested against hand computations.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class LossBank:
    """One running loss per diffusion timestep (or per bin of consecutive timesteps), for one shard.

    An entry starts unset (``init="first"``: it takes the first loss seen at its timestep) or at 0
    (``init="zero"``, the reference code). With ``bins``, timestep t uses entry t * bins // T, so each
    entry averages over T / bins timesteps: more samples per entry, less noise; ``bins=None`` is one
    entry per timestep (the paper). Values and flags live on the CPU in fp32.
    """

    def __init__(self, num_timesteps: int, decay: float = 0.8, init: str = "first", bins: int | None = None):
        if init not in ("first", "zero"):
            raise ValueError(f"agc_bank_init must be 'first' or 'zero', got {init!r}")
        if bins is not None and not 1 <= bins <= num_timesteps:
            raise ValueError(f"agc_bank_bins must be between 1 and the {num_timesteps} timesteps, got {bins}")
        self.decay = decay
        self.num_timesteps = num_timesteps
        self.bins = bins or num_timesteps
        self.values = torch.zeros(self.bins, dtype=torch.float32)
        self.is_set = torch.full((self.bins,), init == "zero", dtype=torch.bool)

    def entries(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The bank entry of each timestep."""
        return timesteps.cpu().long() * self.bins // self.num_timesteps

    def keep_mask(self, losses: torch.Tensor, timesteps: torch.Tensor, agc_lambda: float) -> torch.Tensor:
        """True for samples that enter the gradient: l_i >= lambda * b[e(t_i)], or b[e(t_i)] unset.
        A non-finite loss is never kept: one NaN in the gradient would ruin the shard's weights."""
        losses, e = losses.detach().float().cpu(), self.entries(timesteps)
        skip = self.is_set[e] & (losses < agc_lambda * self.values[e])
        return ~skip & torch.isfinite(losses)

    def step(self, losses: torch.Tensor, timesteps: torch.Tensor, agc_lambda: float,
             exempt: torch.Tensor) -> torch.Tensor:
        """One micro-batch: its keep mask against the bank as it was, then the bank updated with its losses.
        `exempt` samples (anchored ones: their loss is not a denoising loss) are kept when finite and not banked."""
        keep = self.keep_mask(losses, timesteps, agc_lambda)
        exempt = exempt.cpu()
        self.update(losses[~exempt], timesteps[~exempt])
        return keep | (exempt & torch.isfinite(losses.detach().float().cpu()))

    def update(self, losses: torch.Tensor, timesteps: torch.Tensor) -> None:
        """b[e] <- beta*b[e] + (1-beta)*l_i for every finite sample, in batch order (repeated entries compound).
        A non-finite loss is left out: it would turn its entry, and AGC at that timestep, off for good."""
        beta = self.decay
        for loss, e in zip(losses.detach().float().cpu().tolist(), self.entries(timesteps).tolist()):
            if not math.isfinite(loss):
                continue
            if self.is_set[e]:
                # Same fp32 arithmetic as a torch expression would do.
                self.values[e] = beta * self.values[e] + (1 - beta) * loss
            else:
                self.values[e] = loss
                self.is_set[e] = True

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "is_set": self.is_set.clone(), "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if state["values"].shape != self.values.shape:
            raise ValueError(f"the checkpoint's loss bank has {state['values'].numel()} entries, this run's "
                             f"{self.values.numel()}: resume needs the same agc_bank_bins")
        self.values.copy_(state["values"])
        self.is_set.copy_(state["is_set"])
        self.decay = state["decay"]


def kept_sum(losses: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the kept samples' (optionally weighted) losses. Divided by the kept count of the whole
    optimizer step (every micro-batch, every process of a shard group), it is the step's loss: a mean
    over kept samples, not a mean of per-micro-batch means."""
    keep = keep.to(losses.device)
    values = losses if weights is None else losses * weights
    return values[keep].sum()


def exclusion_mask(seen: np.ndarray, skipped: np.ndarray, threshold: float, min_visits: int) -> np.ndarray:
    """Samples AGC skipped in at least `threshold` of their visits, judged after `min_visits` visits:
    the ones it keeps calling memorized (--agc_exclusion)."""
    # skipped / seen rounds exactly as the decimal threshold does when they are equal (0.55 * 100 would not).
    share = np.divide(skipped, seen, out=np.zeros(len(seen)), where=seen > 0)
    return (seen >= min_visits) & (share >= threshold)
