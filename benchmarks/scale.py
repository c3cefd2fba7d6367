"""Near-duplicate search and the eval's search at web scale: synthetic embeddings with planted families of copies.

    python benchmarks/scale.py [--sizes 50000 200000 1000000] [--searches exact ivf hnsw] [--exact_max 50000]

Each row set holds unit vectors in `--dim` dimensions; 1 % of them are sources of a planted family, each with
`--copies` near copies (noise sigma 0.15: 1 - cosine ~0.011 to the source, ~0.022 between copies, while unrelated
rows lie near 1). Every (size, search) runs in its own process, so its peak RSS is its own: dedup is
memmit's find_duplicate_clusters with the embedding detector's distance and threshold (1 - cosine < 0.05), the
eval's search is cluster_memorization_report of 256 samples against all rows (exact: it is linear in the rows).
Recall: the share of planted families found whole in one cluster; false merges: clusters holding members of
more than one family (or unrelated rows). Exact search runs up to `--exact_max` rows (its work is quadratic).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from memmit.data.dedup import find_duplicate_clusters
from memmit.data.detectors import DEFAULT_THRESHOLDS
from memmit.eval.metrics import cluster_memorization_report

SOURCE_SHARE = 0.01
NOISE = 0.15
EVAL_SAMPLES = 256


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The embedding detector's distance (detectors.EmbeddingDetector), on rows already of unit length."""
    return 1 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def planted(size: int, dim: int, copies: int, seed: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """`size` unit rows: unrelated ones, then families (a source and its copies), in a seeded shuffle."""
    g = torch.Generator().manual_seed(seed)
    sources = int(size * SOURCE_SHARE)
    unrelated = size - sources * (1 + copies)
    base = torch.nn.functional.normalize(torch.randn(unrelated + sources, dim, generator=g), dim=1)
    family_rows = base[unrelated:].repeat_interleave(copies, 0)
    noisy = family_rows + NOISE / dim ** 0.5 * torch.randn(family_rows.shape, generator=g)
    rows = torch.cat([base, torch.nn.functional.normalize(noisy, dim=1)])
    order = torch.randperm(size, generator=g)
    position = torch.empty(size, dtype=torch.long)
    position[order] = torch.arange(size)
    families = [[int(position[unrelated + f])] + [int(position[unrelated + sources + f * copies + c])
                                                  for c in range(copies)] for f in range(sources)]
    return rows[order], families


def one(size: int, search: str, dim: int, copies: int) -> dict:
    rows, families = planted(size, dim, copies)
    start = time.perf_counter()
    clusters = find_duplicate_clusters(rows, DEFAULT_THRESHOLDS["dedup"]["embedding"], cosine_distance,
                                       search_metric="cosine", search=search)
    dedup_s = time.perf_counter() - start
    owner = {i: c for c, members in enumerate(clusters) for i in members}
    found = sum(len({owner.get(i, -1 - i) for i in family}) == 1 for family in families)
    family_of = {i: f for f, family in enumerate(families) for i in family}
    false_merges = sum(len({family_of.get(i, -1 - i) for i in members}) > 1 for members in clusters)
    samples = rows[torch.randperm(size, generator=torch.Generator().manual_seed(1))[:EVAL_SAMPLES]]
    start = time.perf_counter()
    cluster_memorization_report(samples, rows, clusters, device="cpu")
    eval_s = time.perf_counter() - start
    return {"size": size, "search": search, "dedup_s": dedup_s, "eval_s": eval_s,
            "recall": found / len(families), "false_merges": false_merges, "clusters": len(clusters),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--searches", nargs="+", default=["exact", "ivf", "hnsw"])
    parser.add_argument("--exact_max", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "SEARCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.dim, args.copies)))
        return
    print(f"{args.dim}-d unit embeddings, {SOURCE_SHARE:.0%} sources with {args.copies} copies each; "
          f"threads {torch.get_num_threads()}")
    print(f"{'rows':>9} {'search':>7} {'dedup s':>9} {'eval s':>8} {'recall':>8} {'false merges':>13} "
          f"{'peak RSS MiB':>13}")
    for size in args.sizes:
        for search in args.searches:
            if search == "exact" and size > args.exact_max:
                continue
            out = subprocess.run([sys.executable, __file__, "--one", str(size), search, "--dim", str(args.dim),
                                  "--copies", str(args.copies)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{size:>9,} {search:>7} {r['dedup_s']:>9.1f} {r['eval_s']:>8.2f} {r['recall']:>8.4f} "
                  f"{r['false_merges']:>13} {r['peak_rss_mib']:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
