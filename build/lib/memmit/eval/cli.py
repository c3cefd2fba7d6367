"""`memmit eval` and `memmit compare`: command lines over the evaluation, prompt detection and report tables."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from ..config import EvalConfig, parse_args
from .detect import detect_prompts, format_detection
from .figures import draw_compare
from .report import evaluate
from .tables import compare_rows, format_compare, format_report, load_report


def eval_main(argv: list[str] | None = None) -> int:
    """`memmit eval`, also under `accelerate launch` (sampling split across the processes): bad input exits 2 with
    one message, before sampling."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_args(argv, EvalConfig, prog="memmit eval")
        # Under `accelerate launch`, its processes (ACCELERATE_USE_CPU: gloo processes on CPUs, as for training).
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        if config.detect_prompts:  # a few denoiser steps per prompt: the main process alone
            report = detect_prompts(config) if state.is_main_process else None
        else:
            # Only the main process loads and checks; the others wait for its prompts, and the launcher stops them.
            report = evaluate(config, state.is_local_main_process, state)
        # Left to the interpreter's exit, gloo's threads may abort a process ("terminate called without an
        # active exception") that has finished its share while the main process still scores.
        state.destroy_process_group()
    except ValueError as exc:
        print(f"memmit: error: {exc}", file=sys.stderr)
        return 2
    if report is None:  # a process that was not the main one
        return 0
    if config.detect_prompts:
        print(format_detection(report))
        print(f"memmit: ranking written to {Path(config.output_dir) / 'detect_prompts.json'}")
    else:
        print(format_report(report))
        print(f"memmit: report written to {Path(config.output_dir) / 'report.json'}")
    return 0


def compare_main(argv: list[str] | None = None) -> int:
    """`memmit compare`: a table and a bar chart of several eval reports."""
    p = argparse.ArgumentParser(prog="memmit compare", description="Compare memmit eval reports.")
    p.add_argument("reports", nargs="+", help="report.json files (or the directories holding them).")
    p.add_argument("--labels", nargs="+", help="One label per report (default: each report's directory name).")
    p.add_argument("--output", help="Figure path (default: compare.png next to the first report).")
    args = p.parse_args(argv)
    try:
        if args.labels is not None and len(args.labels) != len(args.reports):
            raise ValueError(f"got {len(args.labels)} labels for {len(args.reports)} reports")
        reports = [load_report(r) for r in args.reports]
    except ValueError as exc:
        print(f"memmit: error: {exc}", file=sys.stderr)
        return 2
    first = Path(args.reports[0])
    labels = args.labels or [(Path(r) if Path(r).is_dir() else Path(r).parent).resolve().name for r in args.reports]
    output = Path(args.output) if args.output else (first if first.is_dir() else first.parent) / "compare.png"
    rows = compare_rows(reports, labels)
    print(format_compare(rows))
    draw_compare(rows, output)
    print(f"memmit: figure written to {output}")
    return 0
