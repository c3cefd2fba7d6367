"""Checkpoints that are complete or absent: written to a hidden temporary folder, then renamed.

Layout: checkpoints/checkpoint-<step>/{shared.pt, process_<rank>.pt}. The shared part (θ̄, the position)
comes from the main process; each process writes the state of its own shards and its share of the round's
sum, which accelerate's save_state would not hold.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..data.content import first_difference

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "shared.pt").is_file()]
    return [p for _, p in sorted(found)]


def resolve(root: Path, which: str) -> Optional[Path]:
    """'latest' -> the newest complete checkpoint (or None); otherwise the given directory, checked."""
    if which == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(which)
    if not path.is_dir() and (root / which).is_dir():
        path = root / which
    if not (path / "shared.pt").is_file():
        raise ValueError(f"resume_from_checkpoint {which!r} is not a complete memmit checkpoint")
    return path


def save(accelerator: Accelerator, root: Path, step: int, shared: dict, process_state: dict,
         total_limit: Optional[int] = None) -> Path:
    """Write a checkpoint named after the main process's step; every process must call this together."""
    if accelerator.num_processes > 1:
        step = broadcast_object_list([step])[0]
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(process_state, tmp / f"process_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # shared.pt is what marks a checkpoint complete, so it is written last, then the folder renamed.
        torch.save(dict(shared, num_processes=accelerator.num_processes), tmp / "shared.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, path: Path) -> tuple[dict, dict]:
    shared = torch.load(path / "shared.pt", weights_only=True)
    if shared["num_processes"] != accelerator.num_processes:
        raise ValueError(f"checkpoint {path} was written by {shared['num_processes']} processes; "
                         f"resume it with the same number (now {accelerator.num_processes})")
    process_state = torch.load(path / f"process_{accelerator.process_index}.pt", weights_only=True)
    return shared, process_state


def check_resume(path: Path, shared: dict, cfg: dict, free: set[str], shards: list[list[int]], content: list[str],
                 sources: list[str]) -> dict[str, tuple]:
    """Refuse a resume whose arithmetic differs from the checkpoint's `shared` state: one error naming every changed
    option with both values, or the first sample whose content changed. Returns the free options (logging,
    checkpointing, push, ...) that did change."""
    saved_config = shared["config"]
    if "content" not in shared:
        raise ValueError(f"checkpoint {path} was written by an older memmit, which did not record the data's content; "
                         "start a new run (without --resume_from_checkpoint)")
    if difference := first_difference(shared["content"], content, sources):
        raise ValueError(f"cannot resume from {path}: the training data changed since it was written ({difference}); "
                         "restore the data, or start a new run")
    changed = {k: (saved_config.get(k), v) for k, v in cfg.items() if k in saved_config and saved_config[k] != v}
    fixed = {k: pair for k, pair in changed.items() if k not in free}
    if fixed:
        listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in fixed.items())
        raise ValueError(f"cannot resume from {path}: options that change the run's arithmetic differ from the "
                         f"checkpoint's ({listed}); pass the checkpoint's values or start a new run")
    if shared["shards"] != shards:
        raise ValueError(f"cannot resume from {path}: it was made with another shard split (the data, "
                         "max_train_samples or duplicate detection changed); resume needs the same data")
    return {k: pair for k, pair in changed.items() if k in free}


def run_state(model, shards: dict, counts, position: dict, step: int, nonfinite_run: int, split: list[list[int]],
              content: list[str], config: dict) -> tuple[dict, dict]:
    """What a checkpoint holds: the part every process shares (θ̄, position, split, the data's content digests,
    exclusions, the settings resume checks) and this process's (its shards' streams, banks and optimizer states, its share of the round's
    sum, its counts, its RNG, and the live weights when a shard is in the middle of its turn)."""
    # θ̄ is the same everywhere; the round's sum so far holds each process's own shards, so it is the process's.
    shared = {"model": model.state_dict("average"), "position": position, "step": step, "shards": split,
              "content": content, "excluded": counts.excluded, "config": config}
    process = {"shards": {k: s.state_dict() for k, s in shards.items()}, "counts": counts.state_dict(),
               "torch_rng": torch.get_rng_state(), "nonfinite_run": nonfinite_run,
               "round_sum": model.state_dict("accumulator")}
    if any(s.is_open for s in shards.values()):
        process["live_weights"] = model.live_state()
    return shared, process


def restore_run(shared: dict, process: dict, model, shards: dict, counts) -> tuple[dict, int, int]:
    """The inverse of run_state; returns (position, step, nonfinite_run) for the loop."""
    if "round_sum" not in process:
        raise ValueError("the checkpoint was written by an older memmit, which kept one process's round sum for "
                         "all; start a new run (without --resume_from_checkpoint)")
    model.load_state_dict("average", shared["model"])
    model.load_state_dict("accumulator", process["round_sum"])
    counts.excluded = shared["excluded"]
    counts.load_state_dict(process["counts"])
    for k, state in process["shards"].items():
        shards[k].load_state_dict(state)
    torch.set_rng_state(process["torch_rng"])
    if "live_weights" in process:
        model.load_live_state(process["live_weights"])
    return shared["position"], shared["step"], process["nonfinite_run"]
