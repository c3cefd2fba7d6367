"""Reports as text: one evaluation's main numbers, and several reports side by side (`memmit compare`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

MQ_THRESHOLD = "0.5"  # the neighbourhood-score threshold `compare` shows


def _describe_top(top: Optional[dict]) -> str:
    if top is None:
        return "none"
    # source_names falls back to "index i" when a dataset stores no file paths.
    name = top["source"] if top["source"] == f"index {top['index']}" else f"{top['source']} (index {top['index']})"
    return f"{name}, copied by {top['count']} sample{'s' if top['count'] != 1 else ''}"


def _describe_family(top: Optional[dict]) -> str:
    if top is None:
        return "none"
    return (f"{top['size']} image{'s' if top['size'] != 1 else ''} ({top['members'][0]}, ...), copied by "
            f"{top['count']} sample{'s' if top['count'] != 1 else ''}")


def pct(fraction: Optional[float]) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def format_report(report: dict) -> str:
    """The main numbers as a plain-text table."""
    pixel, features, quality = report["pixel"], report["features"], report["quality"]
    clusters = pixel["clusters"]
    top = pixel["most_copied"][0] if pixel["most_copied"] else None
    by_score = pixel["fraction_memorized_by_score"]
    rows = [("samples / training images (distinct)",
             f"{pixel['num_samples']} / {pixel['num_train']} ({pixel['num_distinct_train']})"),
            (f"memorized, d1/d2 < {pixel['threshold']:.3g}", f"{100 * pixel['fraction_memorized_ratio']:.1f}%"),
            ("  counting only byte-identical copies as one",
             f"{100 * pixel['byte_identical']['fraction_memorized_ratio']:.1f}%"),
            (f"near-duplicate clusters ({clusters['detector']['features']} < {clusters['detector']['threshold']:g})",
             f"{clusters['num_clusters']} holding {clusters['num_samples_in_clusters']} images, largest "
             f"{clusters['largest']}"),
            (f"neighbourhood score < {min(by_score, key=float)} .. {max(by_score, key=float)}",
             " ".join(f"{100 * v:.1f}%" for v in by_score.values())),
            ("most copied training image", _describe_top(top)),
            ("most copied family", _describe_family(pixel["most_copied_clusters"][0] if pixel["most_copied_clusters"]
                                                    else None))]
    if features is not None:
        cos = features["cosine"]
        rows.append((f"cosine ({features['extractor']['kind']}) mean / p95 / >0.5",
                     f"{cos['mean']:.3f} / {cos['p95']:.3f} / {100 * cos['frac_above_0_5']:.1f}%"))
    for name, group in ((name, report["prompts"][name]) for name in ("duplicated", "other") if "prompts" in report):
        rows.append((f"  for {name} captions as prompts ({group['num_samples']} samples)",
                     pct(group["fraction_memorized_ratio"])))
    if "alignment" in report.get("prompts", {}):
        aligned = report["prompts"]["alignment"]
        rows.append((f"prompt alignment ({aligned['num_samples_naming_one_class']} samples naming a class)",
                     pct(aligned["fraction_aligned"])))
        # (reports reused from before 2026-12-03 lack the split)
        rows += [(f"  for {name} captions as prompts", pct(aligned[f"fraction_aligned_{name}"]))
                 for name in ("duplicated", "other") if f"fraction_aligned_{name}" in aligned]
    rows.append((f"Frechet distance ({quality['extractor']['kind']})",
                 f"{quality['frechet_distance']:.3f}" if quality["available"] else f"unavailable: {quality['reason']}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def load_report(path: str) -> dict:
    """A report.json, or the one inside a directory."""
    file = Path(path) / "report.json" if Path(path).is_dir() else Path(path)
    try:
        report = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read report {str(file)!r}: {exc}") from exc
    if not isinstance(report, dict) or "pixel" not in report:
        raise ValueError(f"{str(file)!r} is not a memmit eval report")
    return report


def compare_rows(reports: list[dict], labels: list[str]) -> list[dict]:
    """The numbers `compare` shows, one dict per report."""
    rows = []
    for label, r in zip(labels, reports):
        quality, prompts = r.get("quality") or {}, r.get("prompts", {})
        alignment = prompts.get("alignment", {})
        rows.append({"label": label,
                     "memorized_pct": 100 * r["pixel"]["fraction_memorized_ratio"],
                     "mq_pct": 100 * r["pixel"]["fraction_memorized_by_score"][MQ_THRESHOLD],
                     "top_count": r["pixel"]["most_copied"][0]["count"] if r["pixel"]["most_copied"] else 0,
                     "quality": quality.get("frechet_distance") if quality.get("available") else None,
                     "duplicated_prompts": prompts.get("duplicated", {}).get("fraction_memorized_ratio"),
                     "other_prompts": prompts.get("other", {}).get("fraction_memorized_ratio"),
                     "aligned": alignment.get("fraction_aligned"),
                     "aligned_other": alignment.get("fraction_aligned_other")})
    return rows


def format_compare(rows: list[dict]) -> str:
    # Text-to-image columns only where some report has them.
    extra = [(key, name) for key, name in (("duplicated_prompts", "dup. prompts mem."),
                                           ("other_prompts", "other prompts mem."), ("aligned", "aligned"),
                                           ("aligned_other", "aligned, other prompts"))
             if any(r[key] is not None for r in rows)]
    header = ("report", "memorized %", f"MQ<{MQ_THRESHOLD} %", "top copies", "Frechet dist.", *(n for _, n in extra))
    cells = [header] + [(r["label"], f"{r['memorized_pct']:.1f}", f"{r['mq_pct']:.1f}", str(r["top_count"]),
                         "-" if r["quality"] is None else f"{r['quality']:.3f}", *(pct(r[key]) for key, _ in extra))
                        for r in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
                     for row in cells)
