"""Efficacy: memorization and quality of every arm on the quickstart's data (or the same construction from
scikit-learn's digits, --digits sklearn_digits), measured with `memmit eval`.

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

from memmit.testbeds.digits import COPY_STYLES, DIGIT_SETS, build_dataset, build_digit_features, data_dir, features_file
from memmit.testbeds.unconditional import measure, mitigate, pretrain

# configs/quickstart.yaml (memmit's default: K = 1, lambda = 0.5, dedup keep_one, 16 rounds x 24 steps)
# is the base of every arm. Four shards take 6 steps a round each to keep the 384-step budget.
FOUR_SHARDS = ("--num_shards", 4, "--local_steps", 6)
ARMS = {
    "plain": ("--agc_lambda", 0, "--dedup", "none"),
    "iet_only": FOUR_SHARDS + ("--agc_lambda", 0, "--dedup", "none"),
    "agc_only": ("--dedup", "none"),
    "paper": FOUR_SHARDS + ("--dedup", "none"),  # = configs/paper-quickstart.yaml
    "dedup_same_shard": FOUR_SHARDS + ("--dedup", "same_shard"),
    "paper_dedup": FOUR_SHARDS,  # the paper + dedup keep_one (memmit's default until 2026-11-28)
    "dedup_iet_only": FOUR_SHARDS + ("--agc_lambda", 0),
    # IET's average moves about 1/K as far as one shard's steps: the same shards at K times the rate.
    "paper_dedup_lr4x": FOUR_SHARDS + ("--learning_rate", 4e-4),
    # --agc_exclusion without dedup: the duplicates must be found by AGC's own skip counts.
    "paper_exclusion": FOUR_SHARDS + ("--dedup", "none", "--agc_exclusion", 0.5),
    "agc_exclusion_0.5": ("--dedup", "none", "--agc_exclusion", 0.5),
    "agc_exclusion_0.3": ("--dedup", "none", "--agc_exclusion", 0.3),
    "agc_exclusion_0.3_v2": ("--dedup", "none", "--agc_exclusion", 0.3, "--agc_exclusion_min_visits", 2),
    # A loss bank of 50 entries, each shared by 20 consecutive timesteps, instead of 1,000.
    "paper_bins50": FOUR_SHARDS + ("--dedup", "none", "--agc_bank_bins", 50),
    "agc_only_bins50": ("--dedup", "none", "--agc_bank_bins", 50),
    "memmit_bins50": ("--agc_bank_bins", 50),
    "memmit": (),  # memmit's default recipe: dedup keep_one + AGC on one shard
    "memmit_exclusion": ("--agc_exclusion", 0.3, "--agc_exclusion_min_visits", 2),
    "oracle": ("--agc_lambda", 0),  # plain fine-tune on the set de-duplicated by memmit's detector
    "memmit_phash": ("--dedup_features", "phash"),
    "memmit_exact_only": ("--dedup_threshold", 0),  # only copies identical to the detector merge
    "memmit_pixels_0.2": ("--dedup_threshold", 0.2),
    "memmit_pixels_0.4": ("--dedup_threshold", 0.4),
}
# A plain fine-tune on one entry of each source digit (ground truth, which only the benchmark knows).
TRUTH_ORACLE = "oracle_truth"


def truth_deduplicated(data: Path) -> Path:
    """The training set with one entry per source digit (the first), cached beside it."""
    import datasets

    path = data.with_name(f"{data.name}-truth-once")
    if not (path / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(data))
        first = {}
        for i, digit in enumerate(ds["digit_id"]):
            first.setdefault(digit, i)
        ds.select(sorted(first.values())).save_to_disk(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", default="mnist", choices=DIGIT_SETS)
    parser.add_argument("--shift", type=int, default=0,
                        help="move each later copy of a duplicated digit by up to this many pixels (near-duplicates)")
    parser.add_argument("--output_dir", default=None, help="default: efficacy-output[-DIGITS][-shiftN]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--copies", default="exact", choices=COPY_STYLES,
                        help="exact copies, or web-style copies (each copy re-cropped, re-lit, noised and JPEG'd: "
                             "web as issue 10 specifies, mild where a plain fine-tune copied most, EFFICACY.md)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS) + [TRUTH_ORACLE], choices=list(ARMS) + [TRUTH_ORACLE])
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--table_only", action="store_true",
                        help="train nothing: rescore the arms' saved samples with this memmit and print the table")
    args = parser.parse_args()
    out = Path(args.output_dir or "efficacy-output" + ("" if args.digits == "mnist" else f"-{args.digits}")
               + (f"-shift{args.shift}" if args.shift else "") + ("" if args.copies == "exact" else f"-{args.copies}"))
    data = build_dataset(data_dir(out, args.digits, shift=args.shift, style=args.copies), args.digits,
                         shift=args.shift, style=args.copies)
    features = build_digit_features(features_file(data), data, args.digits)
    pretrained = pretrain(out, data, 2000)
    reuse = args.table_only
    def score(runs):
        return measure(out, data, runs, features, args.num_samples, 50, reuse, args.digits)
    results = {"pretrained": score({"pretrained": pretrained})}
    for arm in args.arms:
        def train(name, seed):
            if arm == TRUTH_ORACLE:
                return mitigate(out, truth_deduplicated(data), pretrained, name, "--agc_lambda", 0, "--dedup", "none",
                                "--seed", seed)
            return mitigate(out, data, pretrained, name, *ARMS[arm], "--seed", seed)
        results[arm] = score({f"{arm}-seed{s}": out / f"{arm}-seed{s}" if reuse else train(f"{arm}-seed{s}", s)
                              for s in args.seeds})
    (out / "efficacy.json").write_text(json.dumps(results, indent=2))
    plain = statistics.mean(r["memorized"] for r in results["plain"]) if "plain" in results else None
    truth_plain = statistics.mean(r["memorized_truth"] for r in results["plain"]) if "plain" in results else None
    print("| arm | memorized % (mean; per seed) | vs plain | ground truth % | vs plain | copies of unique % | "
          "Fréchet, distinct training digits | Fréchet, held-out digits | skip dup / unique % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arm, rows in results.items():
        def col(key, scale=100.0, fmt=".1f"):
            values = [r[key] * scale for r in rows if r[key] is not None]
            if not values:
                return "-"
            return f"{statistics.mean(values):{fmt}} ({'; '.join(format(v, fmt) for v in values)})"
        def change(key, reference):
            return "-" if not reference else f"{statistics.mean(r[key] for r in rows) / reference - 1:+.0%}"
        print(f"| {arm} | {col('memorized')} | {change('memorized', plain)} | {col('memorized_truth')} | "
              f"{change('memorized_truth', truth_plain)} | {col('copies_of_unique')} | {col('frechet', 1.0)} | "
              f"{col('frechet_held_out', 1.0)} | {col('skip_duplicated')} / {col('skip_unique')} |")


if __name__ == "__main__":
    main()
