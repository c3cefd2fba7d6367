"""Efficacy: memorization and quality of every arm on the quickstart's data, measured with `memmit eval`.

Arms share the quickstart's cached data and pretrained pipeline and the recipe's sample budget
(configs/quickstart.yaml: 16 epochs); each runs with every seed given. Prints a markdown table of
means (and the per-seed values) for EFFICACY.md. Usage:
    python benchmarks/efficacy.py [--output_dir efficacy-output] [--seeds 0 1] [--arms plain paper ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from memmit.quickstart import build_dataset, build_digit_features, measure, mitigate, pretrain

PLAIN = ("--num_shards", 1, "--agc_lambda", 0)
ARMS = {
    "plain": PLAIN,
    "iet_only": ("--agc_lambda", 0),
    "agc_only": ("--num_shards", 1),
    "paper": (),  # configs/quickstart.yaml: K = 4, E = 1, lambda = 0.5, the paper's rules
    "dedup_same_shard": ("--dedup", "same_shard"),
    "dedup_keep_one": ("--dedup", "keep_one"),
    "oracle_plain_dedup": PLAIN + ("--dedup", "keep_one"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="efficacy-output")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--num_samples", type=int, default=256)
    args = parser.parse_args()
    out = Path(args.output_dir)
    data = build_dataset(out / "data-u256-r64")
    features = build_digit_features(out / "digit_features.pt", data)
    pretrained = pretrain(out, data, 2000)
    results = {"pretrained": measure(out, data, {"pretrained": pretrained}, features, args.num_samples, 50)}
    for arm in args.arms:
        runs = {f"{arm}-seed{s}": mitigate(out, data, pretrained, f"{arm}-seed{s}", *ARMS[arm], "--seed", s)
                for s in args.seeds}
        results[arm] = measure(out, data, runs, features, args.num_samples, 50)
    (out / "efficacy.json").write_text(json.dumps(results, indent=2))
    print("| arm | memorized % (mean; per seed) | copies of duplicated % | Fréchet distance | skip dup / unique % |")
    print("|---|---|---|---|---|")
    for arm, rows in results.items():
        def col(key, scale=100.0, fmt=".1f"):
            values = [r[key] * scale for r in rows if r[key] is not None]
            if not values:
                return "-"
            return f"{statistics.mean(values):{fmt}} ({'; '.join(format(v, fmt) for v in values)})"
        print(f"| {arm} | {col('memorized')} | {col('copies_of_duplicated')} | {col('frechet', 1.0)} | "
              f"{col('skip_duplicated')} / {col('skip_unique')} |")


if __name__ == "__main__":
    main()
