"""The unconditional testbed (`python -m memmit.quickstart`): a small DDPM pretrained offline on real digits with
planted duplicates, so that it copies them; memmit's default, the paper's recipe and a plain fine-tune of the same
budget, each measured by `memmit eval` and against the ground truth the testbed knows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import numpy as np
import yaml

from .digits import (RESOLUTION, build_dataset, build_digit_features, data_dir, features_file, ground_truth,
                     held_out_features, held_out_frechet, truth_memorized)
from .launch import ROOT, launch


def build_initial_pipeline(path: Path) -> Path:
    """A randomly initialised DDPMPipeline: channels 16/32/32, attention at the middle resolution."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=RESOLUTION, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


def pretrain(out: Path, data: Path, steps: int) -> Path:
    """Memorize: train from scratch (memmit with K = 1 and AGC off is a plain training loop). Cached
    per dataset and step count."""
    target = out / f"pretrained-{data.name}-{steps}steps"
    if (target / "model_index.json").is_file():
        print(f"using the cached pretrained pipeline {target}")
        return target
    init = build_initial_pipeline(out / "init")
    launch(["--config", ROOT / "configs" / "quickstart.yaml", "--pretrained_model_name_or_path", init,
            "--dataset_name", data, "--output_dir", target, "--overwrite_output_dir",
            "--num_shards", 1, "--agc_lambda", 0, "--dedup", "none", "--num_rounds", 1, "--local_steps", steps,
            "--learning_rate", 1e-3, "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", 200,
            "--max_grad_norm", "null", "--checkpointing_steps", 500, "--num_validation_images", 0], accelerate=False)
    return target


def mitigate(out: Path, data: Path, pretrained: Path, name: str, *extra, recipe: str = "quickstart") -> Path:
    target = out / name
    launch(["--config", ROOT / "configs" / f"{recipe}.yaml", "--pretrained_model_name_or_path", pretrained,
            "--dataset_name", data, "--output_dir", target, "--overwrite_output_dir", *extra])
    return target


def duplicate_stats(report: dict, is_duplicate: list[bool], digit_ids: list[int]) -> dict:
    """Share of samples copying a duplicated / a unique digit, and how many distinct duplicated digits are copied."""
    per = report["pixel"]["per_sample"]
    copied = [i for i, m in zip(per["nearest_index"], per["memorized"]) if m]
    dup = [i for i in copied if is_duplicate[i]]
    n = len(per["memorized"])
    return {"copies_of_duplicated": len(dup) / n, "copies_of_unique": (len(copied) - len(dup)) / n,
            "distinct_duplicated_copied": len({digit_ids[i] for i in dup})}


def skip_stats(run: Path, is_duplicate: list[bool]) -> dict:
    """AGC's skip fraction over the run, on duplicated vs unique training entries (none with AGC off)."""
    if not yaml.safe_load((run / "memmit" / "config.yaml").read_text())["agc_lambda"]:
        return {}
    totals = {True: [0, 0], False: [0, 0]}
    with open(run / "memmit" / "candidates.csv") as f:
        for row in csv.DictReader(f):
            seen_skipped = totals[is_duplicate[int(row["sample_id"])]]
            seen_skipped[0] += int(row["seen"])
            seen_skipped[1] += int(row["skipped"])
    return {("duplicated" if dup else "unique"): skipped / max(seen, 1) for dup, (seen, skipped) in totals.items()}


def measure(out: Path, data: Path, runs: dict[str, Path], features: Path, num_samples: int,
            inference_steps: int, reuse_samples: bool = False, source: str = "mnist") -> list[dict]:
    """`memmit eval` on every run (or, with reuse_samples, a rescore of its saved samples), plus the
    duplicate-specific numbers the quickstart is about."""
    from ..config import EvalConfig
    from ..eval.report import evaluate, rescore

    ds = datasets.load_from_disk(str(data))
    is_duplicate, digit_ids = ds["is_duplicate"], ds["digit_id"]
    extractor, held_out = held_out_features(features, data, source)  # once: the same for every run
    train, families = ground_truth(ds)
    rows = []
    for label, path in runs.items():
        report_dir = out / "eval" / label
        if reuse_samples and (report_dir / "samples.npy").is_file():
            report = rescore(report_dir)
        else:
            report = evaluate(EvalConfig(pretrained_model_name_or_path=str(path), output_dir=str(report_dir),
                                         dataset_name=str(data), num_samples=num_samples,
                                         num_inference_steps=inference_steps, quality_extractor=str(features)),
                              show_progress=False)
        stats = duplicate_stats(report, is_duplicate, digit_ids)
        skips = skip_stats(path, is_duplicate) if label != "pretrained" else {}
        rows.append({"label": label, "report": str(report_dir / "report.json"),
                     "memorized": report["pixel"]["fraction_memorized_ratio"],
                     "frechet": report["quality"].get("frechet_distance"),
                     "memorized_truth": truth_memorized(np.load(report_dir / "samples.npy"), train, families),
                     "frechet_held_out": held_out_frechet(np.load(report_dir / "samples.npy"), extractor, held_out),
                     **stats,
                     "skip_duplicated": skips.get("duplicated"), "skip_unique": skips.get("unique")})
    return rows


def format_table(rows: list[dict]) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    head = f"{'model':<12}{'memorized':>11}{'dup copies':>12}{'uniq copies':>13}{'dups hit':>10}" \
           f"{'Frechet':>9}{'skip dup':>10}{'skip uniq':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<12}{pct(r['memorized']):>11}{pct(r['copies_of_duplicated']):>12}"
                     f"{pct(r['copies_of_unique']):>13}{r['distinct_duplicated_copied']:>10}"
                     f"{r['frechet'] if r['frechet'] is None else format(r['frechet'], '.1f'):>9}"
                     f"{pct(r['skip_duplicated']):>10}{pct(r['skip_unique']):>11}")
    return "\n".join(lines)


def main(args) -> int:
    """The testbed, then the arms, then the table (`args`: quickstart's parsed options)."""
    from ..eval.cli import compare_main

    out = Path(args.output_dir)
    data = build_dataset(data_dir(out, args.digits, args.num_unique, args.copies), args.digits,
                         num_unique=args.num_unique, copies=args.copies)
    features = build_digit_features(features_file(data), data, args.digits)
    pretrained = pretrain(out, data, args.pretrain_steps)
    rounds = ["--num_rounds", args.num_rounds] if args.num_rounds else []
    runs = {"pretrained": pretrained,
            "memmit": mitigate(out, data, pretrained, "memmit", *rounds),
            "paper": mitigate(out, data, pretrained, "paper", *rounds, recipe="paper-quickstart"),
            # The default's 384-step budget on its one shard, with AGC off and every entry: a plain fine-tune.
            "plain": mitigate(out, data, pretrained, "plain",
                              "--agc_lambda", 0, "--dedup", "none", *rounds)}
    rows = measure(out, data, runs, features, args.num_samples, args.num_inference_steps, source=args.digits)
    compare_main([r["report"] for r in rows] + ["--labels", *runs, "--output", str(out / "compare.png")])
    table = format_table(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nmemorization = share of {args.num_samples} samples whose distance to the nearest training image is "
          "< 1/3 of that to the nearest outside its near-duplicate family\n" + table)
    print(f"\npictures: {out / 'compare.png'} and {out / 'eval'}/*/most_copied.png")
    return 0
