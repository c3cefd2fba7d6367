"""Text-to-image efficacy: every arm on the testbed (memmit/testbeds/text_to_image.py), measured with `memmit eval`.

Arms share the testbed's cached data and pretrained StableDiffusionPipeline and configs/t2i-testbed.yaml's
budget (384 optimizer steps of 32 samples); each runs with every seed given. Prompts are training captions;
memorization is reported for duplicated-caption prompts (by the eval, and by ground truth: d2 outside the true
family of copies) and for the rest; quality is the Fréchet distance in a digit classifier's features against the
distinct training digits and against held-out digits; alignment is the share of samples the classifier reads as
the prompt's digit, over all prompts and over the other (unique-caption) ones, which copying does not inflate.
Prints a markdown table for EFFICACY.md. Usage:
    python benchmarks/efficacy_t2i.py [--output_dir efficacy-t2i-output] [--seeds 0 1] [--arms plain memmit ...]
        [--family sd3]  (the same testbed with an SD3 transformer trained by rectified flow)
        [--copy_style web]  (web-style copies: each copy its own crop/light/noise/JPEG variant, carrying one of
                             several captions: memmit/testbeds/text_to_image.py's web_captions)
Duplicated-caption prompts are the captions duplicated digits carry; "shared" ones are carried by >= 2 copies,
"single" ones by one copy each (web only: the copies that share no caption).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import datasets
import numpy as np

from efficacy import truth_deduplicated
from memmit.testbeds.digits import ground_truth, held_out_features, held_out_frechet
from memmit.testbeds.text_to_image import ARMS as RECIPE_ARMS
from memmit.testbeds.text_to_image import NO_ANCHOR as RECIPE_NO_ANCHOR
from memmit.testbeds.text_to_image import evaluate_run, fine_tune, prepare

# configs/t2i-testbed.yaml (memmit's text-to-image default: K = 1, lambda = 0.8, dedup keep_one, copied captions
# anchored with weight 8) is the base of every arm; NO_ANCHOR turns the anchoring off.
NO_ANCHOR = tuple(RECIPE_NO_ANCHOR)
AGC_OFF = ("--agc_lambda", 0, "--dedup", "none") + NO_ANCHOR
# Somepalli et al. 2023's settings: RC and CWR with probability 0.4, RT 0.1, GNI sigma 0.1.
CAPTION_RULES = {"replace": ("--caption_replace_prob", 0.4), "insert": ("--caption_insert_prob", 0.1),
                 "repeat": ("--caption_repeat_prob", 0.4), "gni": ("--text_embedding_noise", 0.1)}
ARMS = {**{name: tuple(flags) for name, flags in RECIPE_ARMS.items()},
        "dedup_agc": NO_ANCHOR,  # the text-to-image default until 2026-11-29
        **{name: AGC_OFF + rule for name, rule in CAPTION_RULES.items()},
        **{f"{name}_agc": ("--dedup", "none") + NO_ANCHOR + rule for name, rule in CAPTION_RULES.items()},
        # dedup_agc_replace: the text-to-image default until 2026-12-03
        **{f"dedup_agc_{name}": NO_ANCHOR + rule for name, rule in CAPTION_RULES.items()},
        "dedup_agc_empty": ("--dedup_captions", "empty"),
        **{f"memmit_weight{w}": ("--dedup_anchor_weight", w) for w in (1, 4, 16, 32)},
        "memmit_anchors8": ("--dedup_anchors", 8),
        # anchored samples' timesteps from the noisiest half, third or fifth of the schedule, at weights 8 and 16
        **{f"memmit_noisy{f}{'' if w == 8 else f'_weight{w}'}": ("--dedup_anchor_noisiest", f / 10,
                                                               "--dedup_anchor_weight", w)
           for f in (2, 3, 5) for w in (8, 16)},
        "memmit_replace": CAPTION_RULES["replace"],
        # AGC's loss bank pooled into bins of consecutive timesteps (flow matching: of timestep indices)
        **{f"{arm}_bins{b}": tuple(RECIPE_ARMS[arm]) + ("--agc_bank_bins", b) for arm in ("memmit", "paper")
           for b in (10, 50)}}
# configs/sd15-lora.yaml's adapter (rank 16 on the attention projections), exported merged for the eval.
LORA = ("--lora_rank", 16, "--lora_alpha", 16, "--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0")
ARMS.update({"plain_lora": tuple(RECIPE_ARMS["plain"]) + LORA, "memmit_lora": LORA})
LORA_RATES = (("1e3", 1e-3), ("3e4", 3e-4), ("3e3", 3e-3))
ARMS.update({f"{arm}_lr{tag}": ARMS[arm] + ("--learning_rate", lr) for arm in ("plain_lora", "memmit_lora")
             for tag, lr in LORA_RATES})
ARMS.update({f"memmit_lora_lr{tag}_weight{w}": ARMS["memmit_lora"] + ("--learning_rate", lr, "--dedup_anchor_weight", w)
             for tag, lr in LORA_RATES for w in (8, 16, 32)})
# Other adapters at lr 1e-3 and the default anchor weight: cross-attention key and value only (concept ablation's
# "cross-attn"), every projection of the UNet (attention, feed-forward, the transformer's in/out, the resnets' time
# embedding), and the recipes' targets at rank 64.
LORA_TARGETS = {"kv": ("attn2.to_k", "attn2.to_v"),
                "wide": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                         "time_emb_proj")}
ARMS.update({f"memmit_lora_lr1e3_{name}": ("--lora_rank", 16, "--lora_alpha", 16, "--lora_target_modules", *targets,
                                           "--learning_rate", 1e-3) for name, targets in LORA_TARGETS.items()})
ARMS["memmit_lora_lr1e3_rank64"] = ("--lora_rank", 64, "--lora_alpha", 64, "--lora_target_modules", *LORA[5:],
                                    "--learning_rate", 1e-3)
TRUTH_ORACLE = "oracle_truth"  # a plain fine-tune on one entry of each source digit (ground truth)


def duplicated_truth(samples: np.ndarray, prompts: list[str], duplicated: set[str], train, families) -> float:
    """Ground-truth memorized share among the samples whose prompt is one of `duplicated` (nan when none is)."""
    from memmit.eval.sampling import from_uint8
    from memmit.eval.metrics import cluster_memorization_report

    ids = [i for i, q in enumerate(prompts) if q in duplicated]
    if not ids:
        return float("nan")
    rep = cluster_memorization_report(from_uint8(samples[ids]).flatten(1), train.flatten(1), families)
    return rep["summary"]["fraction_memorized_ratio"]


class Scorer:
    """One pipeline's measures on the testbed: `memmit eval`'s report (under out/eval/LABEL), ground truth on the
    duplicated- and single-copy-caption prompts, Fréchet distance against held-out digits."""

    def __init__(self, out: Path, data: Path, features: Path, digits: str, num_samples: int,
                 table_only: bool = False):
        self.out, self.data, self.features = out, data, features
        self.num_samples, self.table_only = num_samples, table_only
        ds = datasets.load_from_disk(str(data))
        carried = Counter(t for t, dup in zip(ds["text"], ds["is_duplicate"]) if dup)
        self.duplicated = {t for t, n in carried.items() if n > 1}
        self.single = {t for t, n in carried.items() if n == 1}
        self.train, self.families = ground_truth(ds)
        self.extractor, self.held_out = held_out_features(features, data, digits)

    def measure(self, label: str, path: Path) -> dict:
        report_dir = self.out / "eval" / label
        # The pretrained checkpoint is cached, and so is its report (for this many samples).
        reuse = self.table_only or (label == "pretrained" and (report_dir / "report.json").is_file()
                                    and len(np.load(report_dir / "samples.npy")) == self.num_samples)
        report = (json.loads((report_dir / "report.json").read_text()) if reuse
                  else evaluate_run(path, report_dir, self.data, self.features, self.num_samples, 50))
        samples = np.load(report_dir / "samples.npy")
        prompts = json.loads((report_dir / "prompts.json").read_text())
        p = report["prompts"]
        return {"dup_eval": p["duplicated"]["fraction_memorized_ratio"],
                "dup_truth": duplicated_truth(samples, prompts, self.duplicated, self.train, self.families),
                "single_truth": duplicated_truth(samples, prompts, self.single, self.train, self.families),
                "other_eval": p["other"]["fraction_memorized_ratio"],
                "frechet": report["quality"]["frechet_distance"],
                "frechet_held_out": held_out_frechet(samples, self.extractor, self.held_out),
                "aligned": p["alignment"]["fraction_aligned"],
                "aligned_other": p["alignment"]["fraction_aligned_other"]}


def print_table(results: dict[str, list[dict]], baseline: str) -> None:
    """The markdown table of EFFICACY.md: each arm's mean over its seeds (each seed's value in brackets), and its
    duplicated-caption copying relative to `baseline`'s."""
    plain = statistics.mean(r["dup_truth"] for r in results[baseline]) if baseline in results else None
    print(f"| arm | dup. prompts memorized, truth % | vs {baseline} | single-copy captions, truth % | dup. prompts, eval % | "
          "other prompts, eval % | Fréchet, distinct training | Fréchet, held-out | aligned % | aligned, other prompts % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm, rows in results.items():
        def col(key, scale=100.0):
            values = [r[key] * scale for r in rows]
            return f"{statistics.mean(values):.1f} ({'; '.join(f'{v:.1f}' for v in values)})"
        mean_truth = statistics.mean(r["dup_truth"] for r in rows)
        change = f"{mean_truth / plain - 1:+.0%}" if plain else "-"
        print(f"| {arm} | {col('dup_truth')} | {change} | {col('single_truth')} | {col('dup_eval')} | {col('other_eval')} | "
              f"{col('frechet', 1.0)} | {col('frechet_held_out', 1.0)} | {col('aligned')} | {col('aligned_other')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", default="mnist", choices=("mnist", "sklearn_digits"))
    parser.add_argument("--output_dir", default=None, help="default: efficacy-t2i-output[-DIGITS]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=["plain", "paper", "memmit", TRUTH_ORACLE],
                        choices=list(ARMS) + [TRUTH_ORACLE])
    parser.add_argument("--pretrain_steps", type=int, default=1000)
    parser.add_argument("--family", default="sd", choices=("sd", "sd3"),
                        help="the testbed's denoiser: Stable Diffusion's UNet or an SD3 transformer (flow matching)")
    parser.add_argument("--copy_style", default="exact", choices=("exact", "web"))
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--table_only", action="store_true", help="train nothing: rescore saved reports")
    args = parser.parse_args()
    out = Path(args.output_dir or "efficacy-t2i-output" + ("" if args.digits == "mnist" else f"-{args.digits}"))
    data, features, pretrained = prepare(out, args.digits, args.pretrain_steps, family=args.family,
                                         copy_style=args.copy_style)
    scorer = Scorer(out, data, features, args.digits, args.num_samples, args.table_only)
    measure = scorer.measure
    results = {"pretrained": [measure("pretrained", pretrained)]}
    for arm in args.arms:
        rows = []
        for seed in args.seeds:
            name = f"{arm}-seed{seed}"
            if arm == TRUTH_ORACLE:
                path = out / name if args.table_only else fine_tune(out, truth_deduplicated(data), pretrained, name,
                                                                     *AGC_OFF, "--seed", seed)
            else:
                path = out / name if args.table_only else fine_tune(out, data, pretrained, name, *ARMS[arm],
                                                                     "--seed", seed)
            rows.append(measure(name, path))
        results[arm] = rows
    (out / "efficacy.json").write_text(json.dumps(results, indent=2))
    print_table(results, "plain")

if __name__ == "__main__":
    main()
