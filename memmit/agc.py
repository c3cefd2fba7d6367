"""Anti-Gradient Control: the per-timestep loss bank and the keep mask (DESIGN.md §1).

Pure torch and numpy; no accelerate, no I/O, so the rule can be tested against hand computations.
"""

from __future__ import annotations

import numpy as np
import torch


class LossBank:
    """One running loss per diffusion timestep, for one shard.

    An entry starts unset (``init="first"``: it takes the first loss seen at its timestep) or at 0
    (``init="zero"``, the reference code). Values and flags live on the CPU in fp32.
    """

    def __init__(self, num_timesteps: int, decay: float = 0.8, init: str = "first"):
        if init not in ("first", "zero"):
            raise ValueError(f"agc_bank_init must be 'first' or 'zero', got {init!r}")
        self.decay = decay
        self.values = torch.zeros(num_timesteps, dtype=torch.float32)
        self.is_set = torch.full((num_timesteps,), init == "zero", dtype=torch.bool)

    def keep_mask(self, losses: torch.Tensor, timesteps: torch.Tensor, agc_lambda: float) -> torch.Tensor:
        """True for samples that enter the gradient: l_i >= lambda * b[t_i], or b[t_i] unset."""
        losses, t = losses.detach().float().cpu(), timesteps.cpu()
        skip = self.is_set[t] & (losses < agc_lambda * self.values[t])
        return ~skip

    def update(self, losses: torch.Tensor, timesteps: torch.Tensor) -> None:
        """b[t_i] <- beta*b[t_i] + (1-beta)*l_i for every sample, in batch order (repeated t compound)."""
        beta = self.decay
        for loss, t in zip(losses.detach().float().cpu().tolist(), timesteps.cpu().tolist()):
            if self.is_set[t]:
                # Same fp32 arithmetic as a torch expression would do.
                self.values[t] = beta * self.values[t] + (1 - beta) * loss
            else:
                self.values[t] = loss
                self.is_set[t] = True

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "is_set": self.is_set.clone(), "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.values.copy_(state["values"])
        self.is_set.copy_(state["is_set"])
        self.decay = state["decay"]


def masked_mean(losses: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the kept samples' (optionally weighted) losses; caller must ensure keep.any()."""
    keep = keep.to(losses.device)
    values = losses if weights is None else losses * weights
    return values[keep].mean()


def exclusion_mask(seen: np.ndarray, skipped: np.ndarray, threshold: float, min_visits: int) -> np.ndarray:
    """Samples AGC skipped in at least `threshold` of their visits, judged after `min_visits` visits:
    the ones it keeps calling memorized (--agc_exclusion)."""
    # skipped / seen rounds exactly as the decimal threshold does when they are equal (0.55 * 100 would not).
    share = np.divide(skipped, seen, out=np.zeros(len(seen)), where=seen > 0)
    return (seen >= min_visits) & (share >= threshold)
