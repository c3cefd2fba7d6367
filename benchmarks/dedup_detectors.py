"""Near-duplicate detectors measured: pairwise precision and recall of each detector's clusters against the
ground-truth source of every entry, on the quickstart's construction (256 unique digits + 8 digits x 64
copies) with exact and web-style copies, on both digit sets; and false merges among all 5,000 distinct
MNIST digits (every merge there is false). Usage:
    python benchmarks/dedup_detectors.py [--thresholds pixels=0.2,0.25,0.3 phash=8,10,12]
Prints markdown tables for EFFICACY.md.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from math import comb
from pathlib import Path

import datasets

from memmit.data.dataset import iter_images
from memmit.data.detectors import DEFAULT_THRESHOLDS, load_detector
from memmit.testbeds.digits import (COPY_STYLES, DIGIT_SETS, RESOLUTION, build_dataset, data_dir, digit_arrays, digit_image)

SWEEP = {"pixels": [0.15, 0.2, 0.25, 0.3, 0.35, 0.4], "phash": [4, 6, 8, 10, 12, 14, 16]}


def pair_scores(clusters: list[list[int]], sources: list[int]) -> tuple[float, float, int]:
    """(precision, recall, false pairs) of "same cluster" as a predictor of "same source", over all pairs."""
    predicted = sum(comb(len(c), 2) for c in clusters)
    correct = sum(comb(n, 2) for c in clusters for n in Counter(sources[i] for i in c).values())
    true = sum(comb(n, 2) for n in Counter(sources).values())
    return (correct / predicted if predicted else 1.0), (correct / true if true else 1.0), predicted - correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="dedup-output")
    parser.add_argument("--thresholds", nargs="*", default=[], help="detector=t1,t2,... (default: a sweep)")
    args = parser.parse_args()
    sweep = dict(SWEEP, **{k: [float(v) for v in vs.split(",")] for k, vs in (t.split("=") for t in args.thresholds)})
    out = Path(args.output_dir)
    print("| digits | copies | detector | threshold | precision | recall | false pairs | clusters | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for digits in DIGIT_SETS:
        for style in COPY_STYLES:
            path = build_dataset(data_dir(out, digits, style=style), digits, style=style)
            ds = datasets.load_from_disk(str(path))
            images, sources = list(iter_images(ds, "image", show_progress=False)), ds["digit_id"]
            for kind, thresholds in sweep.items():
                for t in thresholds:
                    start = time.perf_counter()
                    clusters = load_detector(kind, t, RESOLUTION, 1).clusters(images)
                    precision, recall, false = pair_scores(clusters, sources)
                    mark = "".join(f" ({use} default)" for use, d in DEFAULT_THRESHOLDS.items() if d[kind] == t)
                    print(f"| {digits} | {style} | {kind} | {t:g}{mark} | {precision:.3f} | {recall:.3f} | {false} | "
                          f"{len(clusters)} | {time.perf_counter() - start:.1f} |", flush=True)

    x, _ = digit_arrays("mnist")
    distinct = [digit_image(a) for a in x]
    print("\n| 5,000 distinct MNIST digits | threshold | clusters | digits in clusters | false pairs |")
    print("|---|---|---|---|---|")
    for kind, thresholds in sweep.items():
        for t in thresholds:
            clusters = load_detector(kind, t, RESOLUTION, 1).clusters(distinct)
            print(f"| {kind} | {t:g} | {len(clusters)} | {sum(len(c) for c in clusters)} | "
                  f"{sum(comb(len(c), 2) for c in clusters)} |", flush=True)


if __name__ == "__main__":
    main()
