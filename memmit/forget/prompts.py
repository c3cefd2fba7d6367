"""Prompt files of forget mode: `--forget_prompts` (one prompt a line, or the JSON `memmit eval --detect_prompts`
writes, ranked), `--anchor_prompts` and `--retain_prompts` (one prompt a line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def read_lines(path: str, option: str) -> list[str]:
    """The file's non-empty lines, stripped; a missing or empty file is a ValueError naming the option."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{option} {path!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{option} {path!r} holds no prompt (one per line)")
    return lines


def _ranked(report: dict, path: str) -> list[tuple[str, float]]:
    rows = report.get("prompts")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("prompt"), str)
                                             and isinstance(r.get("score"), (int, float)) for r in rows):
        raise ValueError(f"forget_prompts {path!r} is JSON but not `memmit eval --detect_prompts`' detect_prompts.json "
                         "(a 'prompts' list of {'prompt', 'score'})")
    return [(r["prompt"], float(r["score"])) for r in rows]


def ranking(path: str) -> Optional[list[tuple[str, float]]]:
    """A detect_prompts.json's prompts and scores; None for a file of prompts, one a line."""
    try:
        report = json.loads("\n".join(read_lines(path, "forget_prompts")))
    except json.JSONDecodeError:
        return None
    return _ranked(report, path) if isinstance(report, dict) else None


def read_forget_prompts(path: str, top: Optional[int] = None, min_score: Optional[float] = None) -> list[str]:
    """The prompts to forget, in the file's order (detect_prompts.json: highest score first), each once: the `top`
    first, and of a detect_prompts.json only those scoring at least `min_score`."""
    ranked = ranking(path)
    if ranked is not None:
        prompts = [p for p, score in ranked if min_score is None or score >= min_score]
        if not prompts:
            raise ValueError(f"no prompt of forget_prompts {path!r} scores >= forget_min_score={min_score} "
                             f"(the highest scores {max((s for _, s in ranked), default=float('nan')):.4g})")
    elif min_score is not None:
        raise ValueError(f"forget_min_score reads the scores of a detect_prompts.json, and forget_prompts {path!r} "
                         "is a list of prompts")
    else:
        prompts = read_lines(path, "forget_prompts")
    prompts = list(dict.fromkeys(prompts))
    return prompts[:top] if top is not None else prompts


def lowest_ranked(path: str, taken: list[str], count: int) -> list[str]:
    """Of a detect_prompts.json, the `count` lowest-scoring prompts not among those `taken`, lowest first: prompts
    of the user's own list that the model renders without memorizing. None of a list of prompts."""
    ranked, skip = sorted(ranking(path) or [], key=lambda row: row[1]), set(taken)
    return [p for p in dict.fromkeys(p for p, _ in ranked) if p not in skip][:count]
