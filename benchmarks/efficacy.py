"""Efficacy: memorization and quality of every arm on the quickstart's data, measured with `memmit eval`.

Arms share the quickstart's cached data and pretrained pipeline and the same sample budget: 384
optimizer steps of 32 samples (a plain fine-tune's 16 epochs over the 768 entries); each arm runs
with every seed given. Prints a markdown table of
means (and the per-seed values) for EFFICACY.md. Usage:
    python benchmarks/efficacy.py [--output_dir efficacy-output] [--seeds 0 1] [--arms plain paper ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from memmit.quickstart import (DIGIT_SETS, build_dataset, build_digit_features, data_dir, features_file, measure,
                               mitigate, pretrain)

# configs/quickstart.yaml (memmit's default: K = 4, lambda = 0.5, dedup keep_one, 16 rounds x 6 steps
# per shard) is the base of every arm. One shard takes 24 steps a round to keep the 384-step budget.
ONE_SHARD = ("--num_shards", 1, "--local_steps", 24)
ARMS = {
    "plain": ONE_SHARD + ("--agc_lambda", 0, "--dedup", "none"),
    "iet_only": ("--agc_lambda", 0, "--dedup", "none"),
    "agc_only": ONE_SHARD + ("--dedup", "none"),
    "paper": ("--dedup", "none"),  # = configs/paper-quickstart.yaml
    "dedup_same_shard": ("--dedup", "same_shard"),
    "dedup_keep_one": (),  # memmit's default recipe
    "dedup_keep_one_iet_only": ("--agc_lambda", 0),
    "dedup_keep_one_agc_only": ONE_SHARD,
    "oracle_plain_dedup": ONE_SHARD + ("--agc_lambda", 0),  # plain fine-tune on the de-duplicated set
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", default="mnist", choices=DIGIT_SETS)
    parser.add_argument("--output_dir", default=None, help="default: efficacy-output[-DIGITS]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--table_only", action="store_true",
                        help="train nothing: rescore the arms' saved samples with this memmit and print the table")
    args = parser.parse_args()
    out = Path(args.output_dir or "efficacy-output" + ("" if args.digits == "mnist" else f"-{args.digits}"))
    data = build_dataset(data_dir(out, args.digits), args.digits)
    features = build_digit_features(features_file(data), data, args.digits)
    pretrained = pretrain(out, data, 2000)
    reuse = args.table_only
    results = {"pretrained": measure(out, data, {"pretrained": pretrained}, features, args.num_samples, 50, reuse)}
    for arm in args.arms:
        runs = {f"{arm}-seed{s}": out / f"{arm}-seed{s}" if reuse else
                mitigate(out, data, pretrained, f"{arm}-seed{s}", *ARMS[arm], "--seed", s) for s in args.seeds}
        results[arm] = measure(out, data, runs, features, args.num_samples, 50, reuse)
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
