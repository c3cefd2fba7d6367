"""Publishing a memmit output to the Hugging Face Hub: early repo check, upload, `memmit push` (card.py writes
the model card).

Only the pipeline, its card and memmit's small metadata folder (config, shards, candidates) are
uploaded; the resumable training state (checkpoints/, logs/) stays local.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import httpx2  # huggingface_hub 2.4's HTTP client: its transport errors are not OSErrors
import yaml
from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from .card import LORA_WEIGHTS, default_repo_id, write_model_card
from .config import SECRET_OPTIONS
from .offline import hub_offline

# Not "*.bin": a pipeline component may legitimately hold pytorch_model.bin weights.
# memmit eval's samples.npy can be hundreds of MB and most_copied.png shows training images next to their copies:
# both stay local; the reports and compare.png are uploaded.
IGNORE_PATTERNS = ["checkpoints/*", "logs/*", "*.pt", "*.pkl", "*optimizer*.bin", "*samples.npy", "*most_copied.png"]


class PushError(RuntimeError):
    """An upload that failed; its message holds the command that retries it."""


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except ValueError as exc:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: {exc}") from exc


def check_hub_settings(push_to_hub: bool, hub_model_id: Optional[str], output_dir: str | Path) -> Optional[str]:
    """The repo id a run will push to (None without push), or ValueError before any training."""
    if not push_to_hub:
        return None
    if hub_offline():
        raise ValueError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE=1 is set; "
                         "unset HF_HUB_OFFLINE or drop --push_to_hub")
    repo_id = hub_model_id or default_repo_id(output_dir)
    _check_repo_id(repo_id)
    return repo_id


def _scrub(text: str, token: Optional[str]) -> str:
    """Server messages are echoed to users: make sure none of them carries the token."""
    for secret in {token, get_token()} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def create_repo_early(repo_id: str, token: Optional[str], private: bool) -> str:
    """Create (or find) the repo before training, so a bad token or name fails in seconds, not hours.

    Returns the full "namespace/name" id the Hub resolved, to push to later.
    """
    _check_repo_id(repo_id)
    try:
        # private=None, not False: a repo not asked to be private gets its namespace's default visibility.
        url = HfApi(token=token).create_repo(repo_id, private=private or None, exist_ok=True)
    except (httpx2.HTTPError, OSError) as exc:
        raise ValueError(f"cannot create Hub repo {repo_id!r}: {_scrub(str(exc), token)}\n"
                         "Check that the token (--hub_token, HF_TOKEN or `hf auth login`) has write access "
                         "and that the repo name is valid.") from exc
    return url.repo_id


def files_to_upload(output_dir: str | Path) -> list[str]:
    """The repo paths `push` uploads: the same filter, on the same listing, that upload_folder applies."""
    root = Path(output_dir)
    paths = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS))


def _read_config(out: Path) -> Optional[dict]:
    path = out / "memmit" / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _check_pushable(out: Path, repo_id: str) -> None:
    if hub_offline():
        raise ValueError("memmit push needs the Hub, but HF_HUB_OFFLINE=1 is set; unset HF_HUB_OFFLINE")
    if not (out / "model_index.json").is_file() and not (out / LORA_WEIGHTS).is_file():
        raise ValueError(f"{str(out)!r} holds no diffusers pipeline (no model_index.json) and no {LORA_WEIGHTS}")
    _check_repo_id(repo_id)
    cfg = _read_config(out) or {}
    if leaked := [k for k in SECRET_OPTIONS if cfg.get(k)]:
        raise ValueError(f"{out / 'memmit' / 'config.yaml'} holds {leaked}, which would be uploaded; remove it")
    if not (out / "README.md").is_file() and not cfg:
        raise ValueError(f"{str(out)!r} has neither README.md nor memmit/config.yaml to write a model card from")


def retry_command(output_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """The command that redoes a push; the token comes from the environment, never from this line."""
    return (f"memmit push {shlex.quote(str(output_dir))} --repo_id {shlex.quote(repo_id)}"
            + (" --private" if private else ""))


def push(output_dir: str | Path, repo_id: str, token: Optional[str] = None, private: bool = False,
         eval_reports: Optional[dict[str, dict]] = None) -> str:
    """Upload the pipeline, its card and memmit/ metadata to `repo_id`; return the commit URL.

    Bad input raises ValueError before any request. A failed upload raises PushError naming the
    retry command; nothing local is modified or removed (the card is written first when it is
    missing or when `eval_reports`, label -> `memmit eval` report, are given for its results).
    """
    out = Path(output_dir)
    _check_pushable(out, repo_id)
    if eval_reports or not (out / "README.md").is_file():
        cfg = _read_config(out)
        if cfg is None:
            raise ValueError(f"{out / 'memmit' / 'config.yaml'} is missing: cannot write the model card")
        write_model_card(out, cfg, cfg.get("pretrained_model_name_or_path"),
                         cfg.get("dataset_name") or cfg.get("train_data_dir"), eval_reports, repo_id=repo_id)
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=out, commit_message="Upload memmit-mitigated pipeline",
                                 ignore_patterns=list(IGNORE_PATTERNS))  # upload_folder extends the list in place
    except Exception as exc:  # network, HTTP or xet storage: all are retried the same way
        raise PushError(f"pushing {out} to {repo_id} failed: {_scrub(str(exc), token)}\n"
                        f"The local output is intact; retry with: {retry_command(out, repo_id, private)}") from exc
    return info.commit_url


def _read_eval_report(item: str) -> tuple[str, dict]:
    """'LABEL=PATH' -> (label, report dict)."""
    label, sep, path = item.partition("=")
    report = Path(path) / "report.json" if Path(path).is_dir() else Path(path)
    if not sep or not label or not report.is_file():
        raise ValueError(f"--eval_report {item!r}: expected LABEL=PATH to a memmit eval report.json or its folder")
    return label, json.loads(report.read_text())


def push_main(argv: list[str] | None = None) -> int:
    """`memmit push OUTPUT_DIR --repo_id ID`: 2 on bad input, 1 on a failed upload."""
    p = argparse.ArgumentParser(prog="memmit push",
                                description="Upload a memmit output (pipeline, model card, memmit/ metadata) to the Hub.")
    p.add_argument("output_dir", help="A memmit output directory (holds model_index.json).")
    p.add_argument("--repo_id", help="Hub repo, 'name' or 'namespace/name' (default: the output dir's name).")
    p.add_argument("--private", action="store_true", help="Create the repo private (an existing repo is left as is).")
    p.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or `hf auth login`).")
    p.add_argument("--eval_report", action="append", default=[], metavar="LABEL=PATH",
                   help="A `memmit eval` report (report.json or its folder) for the card's results, "
                        "e.g. before=eval/before after=eval/after; repeatable.")
    args = p.parse_args(argv)
    repo_id = args.repo_id or default_repo_id(args.output_dir)
    try:
        url = push(args.output_dir, repo_id, token=args.token, private=args.private,
                   eval_reports=dict(_read_eval_report(item) for item in args.eval_report))
    except ValueError as exc:
        print(f"memmit: error: {exc}", file=sys.stderr)
        return 2
    except PushError as exc:
        print(f"memmit: error: {exc}", file=sys.stderr)
        return 1
    print(f"memmit: pushed {args.output_dir} to {repo_id}: {url}")
    return 0
