"""Dataset rows -> the denoiser's inputs (pixels, tokens, SDXL's micro-conditioning), made in the trainer or in a
data-loading worker; every random choice comes from the sample's own generator (draws.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..data.captions import ANCHORS, CaptionNoise
from ..data.dataset import pick_caption
from ..data.transform import ImageTransform

TOKEN_SUFFIXES = ("", "_2", "_3")  # batch keys of each tokenizer's tokens: input_ids, input_ids_2, input_ids_3


@dataclass
class ImageInputs:
    """Dataset rows -> the denoiser's inputs: each image transformed with random crop and flip drawn from its
    sample's own generator. Holds no model, so a data-loading worker receives it cheaply."""

    image_column: str
    transform: ImageTransform

    @property
    def columns(self) -> tuple[str, ...]:
        """The dataset columns it reads."""
        return (self.image_column,)

    def __call__(self, rows: dict, generators: Sequence[torch.Generator], ids: Sequence[int] = ()) -> dict:
        """`ids`: the rows' sample ids, which inputs read from the rows themselves do not need."""
        return {"pixels": torch.stack([self.transform(img, g) for img, g in zip(rows[self.image_column], generators)])}


@dataclass
class CaptionedImageInputs(ImageInputs):
    """ImageInputs and, per image, a tokenized prompt: empty with probability caption_dropout, else its caption
    (one of a list at random) through the caption rules that are on; drawn after the image's crop and flip."""

    caption_column: str = "text"
    caption_dropout: float = 0.0
    caption_noise: CaptionNoise = field(default_factory=CaptionNoise)
    tokenizers: tuple = ()
    max_lengths: tuple[int, ...] = ()  # tokens per prompt of each tokenizer

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.image_column, self.caption_column)

    def __call__(self, rows: dict, generators: Sequence[torch.Generator], ids: Sequence[int] = ()) -> dict:
        inputs = super().__call__(rows, generators)
        return dict(inputs, **self.text_inputs(rows, generators)[1])

    def text_inputs(self, rows: dict, generators: Sequence[torch.Generator]) -> tuple[list[str], dict]:
        """Each row's prompt, and its tokens (`input_ids`). A row with anchor captions (dedup_captions=anchor,
        data/split.py) trains its own caption as is and draws one of its anchors: then `anchor_ids` holds the anchors'
        tokens (the empty prompt's for other rows) and `anchored` marks those rows. A second and third tokenizer's
        tokens (SDXL, SD3, Flux) are `input_ids_2`, `anchor_ids_2`, and so on."""
        anchors = rows.get(ANCHORS) or [[]] * len(generators)
        prompts, drawn = [], []
        for value, choices, g in zip(rows[self.caption_column], anchors, generators):
            prompts.append(pick_caption(value, "first", self.caption_column) if choices else self.prompt(value, g))
            drawn.append(choices[int(torch.randint(len(choices), (), generator=g))] if choices else None)
        text = tokenize(self.tokenizers, self.max_lengths, prompts)
        if any(a is not None for a in drawn):
            text.update(tokenize(self.tokenizers, self.max_lengths, [a or "" for a in drawn], "anchor_ids"),
                        anchored=torch.tensor([a is not None for a in drawn]))
        return prompts, text

    def prompt(self, value, generator: torch.Generator) -> str:
        # Draw the dropout coin only when dropout is on, so caption_dropout=0 leaves the random stream as is.
        if self.caption_dropout and float(torch.rand((), generator=generator)) < self.caption_dropout:
            return ""
        caption = pick_caption(value, generator, self.caption_column)
        return self.caption_noise(caption, generator) if self.caption_noise.active else caption


@dataclass
class MicroConditionedInputs(CaptionedImageInputs):
    """CaptionedImageInputs and SDXL's micro-conditioning of each image, `time_ids`: its original height and
    width, the crop's top and left, the target height and width (the order of diffusers' add_time_ids)."""

    def __call__(self, rows: dict, generators: Sequence[torch.Generator], ids: Sequence[int] = ()) -> dict:
        pixels, crops = [], []
        for img, g in zip(rows[self.image_column], generators):
            x, crop = self.transform.with_crop(img, g)
            pixels.append(x)
            crops.append(crop)
        return {"pixels": torch.stack(pixels), "time_ids": self.time_ids(crops), **self.text_inputs(rows, generators)[1]}

    def time_ids(self, crops: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
        """[N, 6] fp32: each image's ImageTransform.with_crop geometry, then the target height and width."""
        r = self.transform.resolution
        return torch.tensor([[*crop, r, r] for crop in crops], dtype=torch.float32)


def tokenize(tokenizers: Sequence, max_lengths: Sequence[int], prompts: list[str],
             key: str = "input_ids") -> dict[str, torch.Tensor]:
    """Each tokenizer's tokens of the prompts, padded to its max length, under `key`, then `key` + "_2", ..."""
    return {key + suffix: tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                                    return_tensors="pt").input_ids
            for suffix, tokenizer, length in zip(TOKEN_SUFFIXES, tokenizers, max_lengths)}

