"""Images as the denoiser sees them: any PIL mode converted to its channels, resized, cropped, flipped and scaled to
[-1, 1], every random choice from the sample's generator."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from PIL import Image

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def convert_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (L, LA, RGB, RGBA, P, 16-bit, float) to the model's channel count."""
    if channels not in _MODES:
        raise ValueError(f"models with {channels} image channels are not supported (1, 3 or 4)")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and 32-bit grey: PIL's own convert clips to 255, so rescale to 8 bits first.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img if img.mode == _MODES[channels] else img.convert(_MODES[channels])


class ImageTransform:
    """Resize (shorter side), crop, flip, scale to [-1, 1]: the diffusers examples' pipeline, without torchvision."""

    def __init__(self, resolution: int, channels: int, center_crop: bool = False, random_flip: bool = False):
        self.resolution, self.channels = resolution, channels
        self.center_crop, self.random_flip = center_crop, random_flip

    def __call__(self, img: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.with_crop(img, generator)[0]

    def with_crop(self, img: Image.Image, generator: Optional[torch.Generator] = None
                  ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """The transformed image and where it came from: (original height, original width, crop top, crop left),
        the crop in the resized image and, when flipped, the left edge of the crop in the mirrored image (SDXL's
        micro-conditioning; diffusers' SDXL example takes width - left there, one crop width off)."""
        img = convert_mode(img, self.channels)
        r = self.resolution
        w, h = original = img.size
        size = self.resized(w, h)
        if size != (w, h):
            img = img.resize(size, Image.BILINEAR)
        w, h = img.size
        if self.center_crop:
            left, top = self.center(w, h)
        else:
            left = int(torch.randint(0, w - r + 1, (1,), generator=generator))
            top = int(torch.randint(0, h - r + 1, (1,), generator=generator))
        img = img.crop((left, top, left + r, top + r))
        x = torch.from_numpy(np.array(img, dtype=np.float32)).reshape(r, r, self.channels).permute(2, 0, 1)
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            x, left = x.flip(-1), w - left - r
        return x / 127.5 - 1.0, (original[1], original[0], top, left)

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """The size an image of this size is resized to: its shorter side the resolution."""
        r = self.resolution
        scale = r / min(width, height)
        return max(r, round(width * scale)), max(r, round(height * scale))

    def center(self, width: int, height: int) -> tuple[int, int]:
        """The left and top edges of the center crop of a resized image of this size."""
        return (width - self.resolution) // 2, (height - self.resolution) // 2

    def center_crop_geometry(self, width: int, height: int, flipped: bool) -> tuple[int, int, int, int]:
        """What `with_crop` returns with a center crop of an image of this (original) size, flipped or not."""
        w, h = self.resized(width, height)
        left, top = self.center(w, h)
        return height, width, top, w - left - self.resolution if flipped else left
