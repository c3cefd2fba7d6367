"""Pictures of an evaluation: the samples closest to copying beside their nearest training image, and the
memorized share of several reports as bars."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .sampling import to_uint8

FIGURE_PAIRS = 16  # sample / nearest-training-image pairs drawn in most_copied.png
FIGURE_MIN_SIDE = 64  # images are upscaled to at least this many pixels so 16px digits are legible


def _to_pil(image: np.ndarray, scale: int) -> Image.Image:
    """uint8 [H, W, C] -> an RGB PIL image upscaled by `scale` without smoothing."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def draw_most_copied(samples: np.ndarray, train: Tensor, pixel: dict, path: Path, columns: int = 4) -> None:
    """The samples closest to copying (lowest d1/d2) beside their nearest training image, captioned."""
    per_sample = pixel["per_sample"]
    order = sorted(range(len(per_sample["ratio"])), key=lambda i: per_sample["ratio"][i])[:FIGURE_PAIRS]
    train_u8 = to_uint8((train + 1) / 2)
    scale = max(1, math.ceil(FIGURE_MIN_SIDE / samples.shape[1]))
    side, gap, caption = samples.shape[1] * scale, 8, 14
    pair = 2 * side + 2
    font = ImageFont.load_default()
    title = (f"sample | nearest training image   d: L2 distance, r: d1/d2 (copy if r < {pixel['threshold']:.3g}), "
             "xN: its near-duplicate family's size")
    cols = min(columns, len(order))
    width = max(cols * (pair + gap) + gap, int(font.getlength(title)) + 2 * gap)
    rows = math.ceil(len(order) / cols)
    canvas = Image.new("RGB", (width, 20 + rows * (side + caption + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title, fill="black", font=font)
    for slot, i in enumerate(order):
        x = gap + (slot % cols) * (pair + gap)
        y = 20 + (slot // cols) * (side + caption + gap)
        canvas.paste(_to_pil(samples[i], scale), (x, y))
        canvas.paste(_to_pil(train_u8[per_sample["nearest_index"][i]], scale), (x + side + 2, y))
        copied = per_sample["memorized"][i]
        family = per_sample["cluster_size"][i]
        draw.text((x, y + side + 1), f"d={per_sample['d1'][i]:.2f} r={per_sample['ratio'][i]:.2f}"
                  + (f" x{family}" if family > 1 else ""), fill="red" if copied else "black", font=font)
    canvas.save(path)


def draw_compare(rows: list[dict], path: Path) -> None:
    """Horizontal bars of memorized % per report, labelled with the report and its value."""
    font = ImageFont.load_default()
    label_w = int(max(font.getlength(r["label"]) for r in rows)) + 16
    bar_max, row_h, top = 400, 28, 30
    longest = max(max(r["memorized_pct"] for r in rows), 1.0)  # all-zero reports still draw an axis
    canvas = Image.new("RGB", (label_w + bar_max + 70, top + row_h * len(rows) + 10), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 8), "memorized samples (%, d1/d2 criterion)", fill="black", font=font)
    for i, r in enumerate(rows):
        y = top + i * row_h
        length = round(bar_max * r["memorized_pct"] / longest)
        draw.text((8, y + 6), r["label"], fill="black", font=font)
        draw.rectangle((label_w, y + 2, label_w + max(length, 1), y + row_h - 4), fill=(70, 110, 180))
        draw.text((label_w + length + 6, y + 6), f"{r['memorized_pct']:.1f}%", fill="black", font=font)
    canvas.save(path)
