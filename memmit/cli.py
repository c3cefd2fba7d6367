"""Command lines: `memmit train ...` (same as train_memmit.py), `memmit eval ...`, `memmit compare ...`."""

from __future__ import annotations

import importlib
import logging
import sys

from .config import parse_args


def train_main(argv: list[str] | None = None) -> int:
    """Parse, validate and train; bad input exits non-zero with one message, before training."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        cfg = parse_args(argv)
        from .trainer import Trainer  # heavy imports only once the flags are known to be valid

        trainer = Trainer(cfg)
    except ValueError as exc:
        print(f"memmit: error: {exc}", file=sys.stderr)
        return 2
    from .hub import PushError

    try:
        out = trainer.train()
    except PushError as exc:  # the trained output is on disk; only the upload failed
        print(f"memmit: error: {exc}", file=sys.stderr)
        return 1
    print(f"memmit: mitigated pipeline written to {out}")
    return 0


COMMANDS = {"train": "memmit.cli:train_main", "eval": "memmit.evaluate:eval_main",
            "compare": "memmit.evaluate:compare_main", "push": "memmit.hub:push_main"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: memmit {{{','.join(COMMANDS)}}} [options]; `memmit COMMAND --help` for options", file=sys.stderr)
        return 2
    # Each command imports its heavy modules only when chosen.
    module, function = COMMANDS[argv[0]].split(":")
    return getattr(importlib.import_module(module), function)(argv[1:])

if __name__ == "__main__":
    sys.exit(main())
