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
import shutil
from pathlib import Path
from typing import Optional

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

import memmit

from ..cache import cache_root, hash_module, hash_tensor
from ..config import EvalConfig, MemmitConfig
from .figures import draw_compare
from .report import Prepared, eval_workers, prepare_evaluation, run_evaluation, sample_on_processes
from .tables import compare_rows, format_compare

logger = logging.getLogger(__name__)

# Where a pipeline is loaded from does not change what it samples: the fingerprint hashes the weights instead.
LOCATION_SETTINGS = ("pretrained_model_name_or_path", "revision", "variant", "pretrained_vae_model_name_or_path",
                     "output_dir")


def eval_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "memmit" / "eval"


def fingerprint(p: Prepared) -> str:
    """sha256 of everything a report depends on: every component's weights and config, the eval settings,
    the training images as loaded, the prompts, the device kind and memmit's version."""
    h = hashlib.sha256()
    for name, component in sorted(p.task.pipeline.components.items()):
        if isinstance(component, torch.nn.Module):
            hash_module(h, name, component)
        config = getattr(component, "config", None)
        if isinstance(config, dict):  # diffusers' ConfigMixin; "_name_or_path" and the like say where, not what
            h.update(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True,
                                default=str).encode())
        if hasattr(component, "get_vocab"):
            h.update(json.dumps(component.get_vocab(), sort_keys=True).encode())
    settings = {k: v for k, v in dataclasses.asdict(p.config).items() if k not in LOCATION_SETTINGS}
    h.update(json.dumps({"settings": settings, "sources": p.sources, "clusters": p.clusters, "prompts": p.prompts,
                         "device": p.device.type, "memmit": memmit.__version__}, sort_keys=True).encode())
    hash_tensor(h, "train", p.train)
    return h.hexdigest()


def _saved_report(directory: Path, key: str) -> dict | None:
    """The report in `directory` when it was made from the same fingerprint (a killed write is no report)."""
    try:
        report = json.loads((directory / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return report if report.get("fingerprint") == key else None


def evaluate_once(p: Optional[Prepared], config: EvalConfig, label: str, key: Optional[str],
                  state: PartialState, show_progress: bool = True) -> Optional[dict]:
    """Every process calls this (the main one with its Prepared and fingerprint `key`): the report in
    p.config.output_dir when it was made from `key`, else a new one, sampled on every process."""
    report = _saved_report(Path(p.config.output_dir), key) if p is not None else None
    if broadcast_object_list([report is not None])[0]:
        logger.info("memmit: reusing the %s evaluation in %s (same weights, data and settings)", label,
                    p.config.output_dir if p is not None else "the main process's output")
        return report
    samples = sample_on_processes(p, config, state, show_progress)
    if p is None:
        return None
    report = run_evaluation(p, show_progress, samples, fingerprint=key)
    logger.info("memmit: %s evaluation written to %s", label, p.config.output_dir)
    return report


def evaluate_before(p: Optional[Prepared], config: EvalConfig, state: PartialState,
                    show_progress: bool = True) -> Optional[Path]:
    """The input pipeline's report, in the cache (computed there unless already present); returns its folder on
    the main process, which passes its Prepared (the others pass None and sample their share)."""
    key = fingerprint(p) if p is not None else None
    if p is not None:
        p.config = dataclasses.replace(p.config, output_dir=str(cache_root() / "eval" / key))
    # Sampling must not move the global RNGs training draws from (dropout), or --evaluate would change the result.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        evaluate_once(p, config, "before", key, state, show_progress)
    return Path(p.config.output_dir) if p is not None else None


def evaluate_after(cfg: MemmitConfig, before: Optional[Path], state: PartialState,
                   show_progress: bool = True) -> Optional[dict[str, dict]]:
    """Every process calls this once the exported pipeline is on disk (`before` is the main process's "before"
    folder): the main one copies it into output_dir, evaluates the export and draws the comparison."""
    out = eval_dir(cfg.output_dir)
    config = cfg.eval_config(out / "after", before=False)
    after = prepare_evaluation(config, show_progress, eval_workers(state))  # every process: they share the features
    if after is None:
        evaluate_once(None, config, "after", None, state, show_progress)
        return None
    shutil.rmtree(out / "before", ignore_errors=True)  # a killed run's copy may come from other settings
    shutil.copytree(before, out / "before")
    reports = {"before": json.loads((out / "before" / "report.json").read_text()),
               "after": evaluate_once(after, config, "after", fingerprint(after), state, show_progress)}
    draw_compare(compare_rows(list(reports.values()), list(reports)), out / "compare.png")
    return reports


def comparison_table(reports: dict[str, dict]) -> str:
    return format_compare(compare_rows(list(reports.values()), list(reports)))
