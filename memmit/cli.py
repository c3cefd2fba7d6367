"""Command lines: `memmit train ...` (same as train_memmit.py), `memmit eval ...`, `memmit compare ...`."""

from __future__ import annotations

import importlib
import logging
import sys

from .config import parse_args


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' warning that an image processor falls back to PIL without torchvision."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_TORCHVISION_FALLBACK = _TorchvisionFallbackFilter()


def silence_torchvision_fallback() -> None:
    """diffusers imports CLIP and SigLIP image processors memmit never uses, and transformers warns on every run
    that they fall back to PIL; memmit must not install torchvision (it pulls another torch), so the warning is noise."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_TORCHVISION_FALLBACK)


def train_main(argv: list[str] | None = None) -> int:
    """Parse, validate and train; bad input exits non-zero with one message, before training."""
    silence_torchvision_fallback()
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
    silence_torchvision_fallback()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: memmit {{{','.join(COMMANDS)}}} [options]; `memmit COMMAND --help` for options", file=sys.stderr)
        return 2
    # Each command imports its heavy modules only when chosen.
    module, function = COMMANDS[argv[0]].split(":")
    return getattr(importlib.import_module(module), function)(argv[1:])

if __name__ == "__main__":
    sys.exit(main())
