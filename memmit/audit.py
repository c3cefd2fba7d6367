"""`--evaluate`: `memmit eval` of the input pipeline before training and of the exported one after it.

The "before" report depends only on the input weights, the data and the eval settings, so it is cached
under `cache_root()/eval/<fingerprint>` and a rerun (or a resumed run) on the same checkpoint reuses it.
Both reports end up in output_dir/memmit/eval/{before,after}/, beside compare.png.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

import memmit

from .config import MemmitConfig
from .evaluate import Prepared, compare_rows, draw_compare, format_compare, prepare_evaluation, run_evaluation

logger = logging.getLogger(__name__)

# Where a pipeline is loaded from does not change what it samples: the fingerprint hashes the weights instead.
LOCATION_SETTINGS = ("pretrained_model_name_or_path", "revision", "variant", "output_dir")


def cache_root() -> Path:
    """$MEMMIT_CACHE, else $XDG_CACHE_HOME/memmit, else ~/.cache/memmit."""
    if os.environ.get("MEMMIT_CACHE"):
        return Path(os.environ["MEMMIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memmit"


def eval_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "memmit" / "eval"


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # as uint8: numpy has no bfloat16


def fingerprint(p: Prepared) -> str:
    """sha256 of everything a report depends on: every component's weights and config, the eval settings,
    the training images as loaded, the prompts, the device kind and memmit's version."""
    h = hashlib.sha256()
    for name, component in sorted(p.task.pipeline.components.items()):
        if isinstance(component, torch.nn.Module):
            for key, t in component.state_dict().items():
                _hash_tensor(h, f"{name}.{key}", t)
        config = getattr(component, "config", None)
        if isinstance(config, dict):  # diffusers' ConfigMixin; "_name_or_path" and the like say where, not what
            h.update(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True,
                                default=str).encode())
        if hasattr(component, "get_vocab"):
            h.update(json.dumps(component.get_vocab(), sort_keys=True).encode())
    settings = {k: v for k, v in dataclasses.asdict(p.config).items() if k not in LOCATION_SETTINGS}
    h.update(json.dumps({"settings": settings, "sources": p.sources, "clusters": p.clusters, "prompts": p.prompts,
                         "device": p.device.type, "memmit": memmit.__version__}, sort_keys=True).encode())
    _hash_tensor(h, "train", p.train)
    return h.hexdigest()


def _saved_report(directory: Path, key: str) -> dict | None:
    """The report in `directory` when it was made from the same fingerprint (a killed write is no report)."""
    try:
        report = json.loads((directory / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return report if report.get("fingerprint") == key else None


def evaluate_once(p: Prepared, label: str, key: str, show_progress: bool = True) -> dict:
    """run_evaluation, unless config.output_dir already holds the report of fingerprint `key`."""
    out = Path(p.config.output_dir)
    if (report := _saved_report(out, key)) is not None:
        logger.info("memmit: reusing the %s evaluation in %s (same weights, data and settings)", label, out)
        return report
    report = run_evaluation(p, show_progress, fingerprint=key)
    logger.info("memmit: %s evaluation written to %s", label, out)
    return report


def evaluate_before(p: Prepared, show_progress: bool = True) -> Path:
    """The input pipeline's report, in the cache (computed there unless already present); returns its folder."""
    key = fingerprint(p)
    p.config = dataclasses.replace(p.config, output_dir=str(cache_root() / "eval" / key))
    # Sampling must not move the global RNGs training draws from (dropout), or --evaluate would change the result.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        evaluate_once(p, "before", key, show_progress)
    return Path(p.config.output_dir)


def evaluate_after(cfg: MemmitConfig, before: Path, show_progress: bool = True) -> dict[str, dict]:
    """Copy the before report into output_dir, evaluate the exported pipeline, draw the comparison."""
    out = eval_dir(cfg.output_dir)
    shutil.rmtree(out / "before", ignore_errors=True)  # a killed run's copy may come from other settings
    shutil.copytree(before, out / "before")
    after = prepare_evaluation(cfg.eval_config(out / "after", before=False), show_progress)
    reports = {"before": json.loads((out / "before" / "report.json").read_text()),
               "after": evaluate_once(after, "after", fingerprint(after), show_progress)}
    draw_compare(compare_rows(list(reports.values()), list(reports)), out / "compare.png")
    return reports


def comparison_table(reports: dict[str, dict]) -> str:
    return format_compare(compare_rows(list(reports.values()), list(reports)))
