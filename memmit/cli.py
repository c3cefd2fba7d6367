"""Command lines: `memmit train ...` (same as train_memmit.py), `memmit eval ...`, `memmit compare ...`."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .cache import writable_cache
from .config import parse_args

if TYPE_CHECKING:
    from .train.trainer import Trainer


@dataclass
class Plan:
    """A validated run: its trainer, the Hub repo it pushes to, and its "before" report's folder (--evaluate)."""

    trainer: Trainer
    repo_id: Optional[str]
    before: Optional[Path] = None


def prepare(cfg) -> Plan:
    """Everything before training: bad input (the Hub settings and repo, the evaluation's) raises ValueError here;
    with --evaluate, the input pipeline is evaluated (or its cached report found) before training starts."""
    from accelerate import PartialState

    from .eval.audit import evaluate_before
    from .eval.report import prepare_evaluation
    from .hub import check_hub_settings, create_repo_early
    from .train.setup import build_trainer  # heavy imports only once the flags are known to be valid
    from .workers import Workers

    repo_id = check_hub_settings(cfg.push_to_hub, cfg.hub_model_id, cfg.output_dir)
    audit = cfg.evaluate and not cfg.forget_prompts  # forget mode verifies against its own references instead
    if audit:  # the "before" report is kept there: a folder that cannot hold it fails now, not after sampling
        writable_cache("eval")
    trainer = build_trainer(cfg)
    acc = trainer.accelerator
    before_config = cfg.eval_config(cfg.output_dir, before=True) if audit else None
    # Every process prepares (they share the feature work); the main process alone gets the Prepared.
    before = (prepare_evaluation(before_config, acc.is_local_main_process, Workers.of(acc, every_machine=False))
              if before_config else None)
    # Every input is valid: a bad token or repo name fails now, in seconds, not after training.
    if repo_id and acc.is_main_process:
        repo_id = create_repo_early(repo_id, cfg.hub_token, cfg.hub_private_repo)
    before_dir = (evaluate_before(before, before_config, PartialState(), acc.is_local_main_process)
                  if before_config else None)
    acc.wait_for_everyone()
    return Plan(trainer, repo_id, before_dir)


def finish(plan: Plan) -> Path:
    """Train, export the result, evaluate it (--evaluate), write its model card, push it when asked."""
    from accelerate import PartialState

    from .card import write_model_card
    from .eval.audit import comparison_table, eval_dir, evaluate_after
    from .forget.verify import verification_table, verify_run
    from .hub import push
    from .train.export import export_result

    trainer, repo_id = plan.trainer, plan.repo_id
    cfg, acc = trainer.cfg, trainer.accelerator
    trainer.train()
    if acc.is_main_process:
        export_result(trainer.task, trainer.model, cfg, trainer.out)
    acc.wait_for_everyone()  # every process samples its share of the exported pipeline's evaluation
    audit = cfg.evaluate and not cfg.forget_prompts
    reports = evaluate_after(cfg, plan.before, PartialState(), acc.is_local_main_process) if audit else None
    verified = (verify_run(cfg, trainer.out, acc.device, acc.is_local_main_process)
                if cfg.evaluate and cfg.forget_prompts and acc.is_main_process else None)
    if acc.is_main_process:
        write_model_card(trainer.out, cfg.to_dict(), cfg.pretrained_model_name_or_path,
                         cfg.dataset_name or cfg.train_data_dir, eval_reports=reports, repo_id=repo_id)
    acc.wait_for_everyone()
    acc.end_training()
    if acc.is_main_process:
        if repo_id:
            print(f"memmit: pushed to {push(trainer.out, repo_id, cfg.hub_token, cfg.hub_private_repo)}")
        print(f"memmit: mitigated pipeline written to {trainer.out}")
        if reports:  # the run's last lines
            print(f"memmit: memorization before and after ({eval_dir(trainer.out) / 'compare.png'}):")
            print(comparison_table(reports))
        if verified:
            print(f"memmit: forget prompts before and after ({trainer.out / 'memmit' / 'forget' / 'verify.json'}):")
            print(verification_table(verified))
    return trainer.out


def run(cfg) -> Trainer:
    """The whole recipe, in process (tests, notebooks); returns the trainer for inspection."""
    plan = prepare(cfg)
    finish(plan)
    return plan.trainer


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
    """Parse, validate and train; bad input exits 2 with one message, before training."""
    silence_torchvision_fallback()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from .forget import NothingToForget

    try:
        plan = prepare(parse_args(argv))
    except ValueError as exc:
        print(f"memmit: error: {exc}", file=sys.stderr)
        return 2
    except NothingToForget as exc:  # nothing to mitigate is an answer, not an error: no model is written
        print(f"memmit: {exc}\nmemmit: no forget prompt reproduces an image; nothing trained, no model written")
        return 0
    from .hub import PushError
    from .train.trainer import NonFiniteLossError

    try:
        finish(plan)
    except (PushError, NonFiniteLossError) as exc:  # checkpoints stay on disk; the message says what to do
        print(f"memmit: error: {exc}", file=sys.stderr)
        return 1
    return 0


def eval_main(argv: list[str]) -> int:
    from .eval.cli import eval_main

    return eval_main(argv)


def compare_main(argv: list[str]) -> int:
    from .eval.cli import compare_main

    return compare_main(argv)


def push_main(argv: list[str]) -> int:
    from .hub import push_main

    return push_main(argv)


# Each command imports its heavy modules only when chosen: `memmit push --help` loads no torch.
COMMANDS = {"train": train_main, "eval": eval_main, "compare": compare_main, "push": push_main}


def main(argv: list[str] | None = None) -> int:
    silence_torchvision_fallback()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: memmit {{{','.join(COMMANDS)}}} [options]; `memmit COMMAND --help` for options", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])

if __name__ == "__main__":
    sys.exit(main())
