"""Per-sample evidence from AGC: how often each sample was seen, skipped, or gave a non-finite loss.

The most-skipped samples are the memorization candidates (memmit/candidates.csv); with --agc_exclusion
the samples AGC keeps skipping leave later rounds. Counts are per process and summed on demand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .agc import exclusion_mask


class SampleCounts:
    def __init__(self, num_samples: int):
        self.seen = np.zeros(num_samples, dtype=np.int64)
        self.skipped = np.zeros(num_samples, dtype=np.int64)
        self.nonfinite = np.zeros(num_samples, dtype=np.int64)
        # sample id -> when agc_exclusion left it out: {"round", "seen", "skipped"}; the same on every process.
        self.excluded: dict[int, dict] = {}

    def record(self, ids: list[int], keep: torch.Tensor, finite: torch.Tensor) -> None:
        ids = np.asarray(ids, dtype=np.int64)  # an empty share (a group member at an epoch end) too
        self.seen[ids] += 1
        self.skipped[ids[~keep.numpy() & finite.numpy()]] += 1
        self.nonfinite[ids[~finite.numpy()]] += 1

    def totals(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """[seen, skipped, nonfinite] summed over processes (`reduce` sums a tensor across them)."""
        return reduce(torch.from_numpy(np.stack([self.seen, self.skipped, self.nonfinite]))).numpy()

    def exclude(self, rnd: int, shards: list[list[int]], totals: np.ndarray, threshold: float,
                min_visits: int) -> tuple[dict[int, list[int]], list[int]]:
        """--agc_exclusion after round `rnd`: per shard, the ids that leave it now, and the shards that would
        have been emptied (they keep their samples). Decided on the summed counts, so every process agrees."""
        seen, skipped = totals[0], totals[1]
        flagged = exclusion_mask(seen, skipped, threshold, min_visits)
        drops, kept_whole = {}, []
        for k, ids in enumerate(shards):
            active = [i for i in ids if i not in self.excluded]
            drop = [i for i in active if flagged[i]]
            if drop and len(drop) == len(active):
                kept_whole.append(k)
                continue
            for i in drop:
                self.excluded[i] = {"round": rnd, "seen": int(seen[i]), "skipped": int(skipped[i])}
            if drop:
                drops[k] = drop
        return drops, kept_whole

    def state_dict(self) -> dict:
        return {"seen": torch.from_numpy(self.seen.copy()), "skipped": torch.from_numpy(self.skipped.copy()),
                "nonfinite": torch.from_numpy(self.nonfinite.copy())}

    def load_state_dict(self, state: dict) -> None:
        self.seen[:], self.skipped[:] = state["seen"].numpy(), state["skipped"].numpy()
        self.nonfinite[:] = state["nonfinite"].numpy()


def write_candidates(path: Path, totals: np.ndarray, excluded: dict[int, dict], shards: list[list[int]],
                     sources: list[str]) -> None:
    """Samples ranked by how often AGC skipped them: the memorization candidates."""
    seen, skipped, nonfinite = totals
    shard_of = {i: k for k, ids in enumerate(shards) for i in ids}
    frac = np.where(seen > 0, skipped / np.maximum(seen, 1), 0.0)
    order = sorted(range(len(seen)), key=lambda i: (-frac[i], -skipped[i], i))
    lines = ["rank,sample_id,seen,skipped,skip_fraction,nonfinite,shard,excluded_after_round,source"]
    for rank, i in enumerate(order, 1):
        source = sources[i].replace('"', '""')
        shard = shard_of.get(i, "duplicate")  # dedup=keep_one leaves extra copies out of training
        round_out = excluded[i]["round"] if i in excluded else ""
        lines.append(f'{rank},{i},{seen[i]},{skipped[i]},{frac[i]:.4f},{nonfinite[i]},{shard},{round_out},"{source}"')
    path.write_text("\n".join(lines) + "\n")
