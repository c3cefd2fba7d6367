"""Caption-side mitigations of text-to-image memorization (Somepalli et al., "Understanding and Mitigating
Copying in Diffusion Models", NeurIPS 2023): what the literature measures IET-AGC against.

Each is a per-sample rule drawn from the sample's own generator (draws.py), applied to the caption a row trains
with (after caption dropout and the pick among a row's captions). A rule whose probability is 0 draws nothing, so
turning one off leaves every other random draw of the run as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .dataset import pick_caption
from .neighbours import nearest_neighbours

# The options, with the names users pass; an unconditional pipeline refuses them.
CAPTION_OPTIONS = ("caption_replace_prob", "caption_insert_prob", "caption_repeat_prob", "text_embedding_noise")
# The rows' column (data/split.py adds it) of each copy's anchor captions under dedup_captions=anchor: [] trains as usual.
ANCHORS = "memmit_anchors"


def caption_vocabulary(captions: Sequence, column: str) -> list[str]:
    """Every word of the training captions (a list-valued row contributes all its captions), sorted: the words
    random replacement and insertion draw from, so they stay inside the tokenizer's and the data's language."""
    words = set()
    for value in captions:
        for caption in (value if isinstance(value, (list, tuple)) else [value]):
            words.update(pick_caption(caption, "first", column).split())
    return sorted(words)


def _draw(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (), generator=generator))


def _coin(p: float, generator: torch.Generator) -> bool:
    return float(torch.rand((), generator=generator)) < p


@dataclass
class CaptionNoise:
    """Somepalli et al.'s caption rules, in this order, each with its own probability per sample:
    - random caption replacement (RC): the caption becomes as many words drawn from the vocabulary;
    - random word insertion (RT, addition): one vocabulary word inserted at a random position;
    - caption word repetition (CWR): one of the caption's own words inserted again at a random position.
    Gaussian noise on the text embeddings (GNI, `text_embedding_noise`) acts on the encoder's output instead."""

    replace_prob: float = 0.0
    insert_prob: float = 0.0
    repeat_prob: float = 0.0
    vocabulary: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.replace_prob or self.insert_prob or self.repeat_prob)

    def __call__(self, caption: str, generator: torch.Generator) -> str:
        words = caption.split()
        if not words:  # the empty prompt (dropout) stays empty: it trains the unconditional branch
            return caption
        if self.replace_prob and _coin(self.replace_prob, generator):
            words = [self.vocabulary[_draw(len(self.vocabulary), generator)] for _ in words]
        if self.insert_prob and _coin(self.insert_prob, generator):
            word = self.vocabulary[_draw(len(self.vocabulary), generator)]
            words.insert(_draw(len(words) + 1, generator), word)
        if self.repeat_prob and _coin(self.repeat_prob, generator):
            word = words[_draw(len(words), generator)]
            words.insert(_draw(len(words) + 1, generator), word)
        return " ".join(words)


def _captions_of(values: list, ids: list[int]) -> list[str]:
    """The distinct captions of rows `ids`, in order of first appearance (a list-valued row gives all of its own)."""
    return list(dict.fromkeys(caption for i in ids for caption in
                              (values[i] if isinstance(values[i], (list, tuple)) else [values[i]])))


def cluster_captions(values: list, clusters: list[list[int]], shared_empty: bool = False) -> dict[int, list[str]]:
    """For each cluster whose members hold more than one distinct caption: its kept id (the smallest, as
    keep_one keeps) -> those captions, in order of first appearance (a list-valued row gives all of its own).
    With `shared_empty`, a cluster whose copies share one caption -> [""]: the empty prompt."""
    merged = {}
    for cluster in clusters:
        captions = _captions_of(values, sorted(cluster))
        if len(captions) > 1:
            merged[min(cluster)] = captions
        elif shared_empty:
            merged[min(cluster)] = [""]
    return merged


@dataclass
class AnchorPlan:
    """dedup_captions=anchor's rows of the duplicate clusters: `copied` maps the row that unlearns each copied
    caption to that caption and `copies` to how many of its cluster's rows carry it; `captions` maps a kept row whose own caption value is not what it trains to the captions
    it trains (one drawn per step, as merge does); `kept` is every row of a cluster that trains, sorted."""

    copied: dict[int, str]
    copies: dict[int, int]
    captions: dict[int, list[str]]
    kept: list[int]


def plan_anchors(values: list, clusters: list[list[int]]) -> AnchorPlan:
    """A cluster's copied captions are the non-empty captions that >= 2 of its rows carry: the captions a picture
    was re-uploaded under (web duplicates carry several). Each is unlearned on the first of its rows not already
    unlearning another. The cluster's other captions (each carried by one copy, or empty) stay attached to the
    picture on one more row, merged: a caption seen once points at its picture as a unique image's does, so a cluster
    whose copies share no caption is merged as a whole, not unlearned. (A list-valued row carries each of its
    captions; a copied caption left without a row of its own, which only list-valued rows can cause, is merged.)"""
    copied, copies, captions, kept = {}, {}, {}, []
    for cluster in clusters:
        carriers: dict[str, list[int]] = {}
        for i in sorted(cluster):
            for caption in _captions_of(values, [i]):
                carriers.setdefault(caption, []).append(i)
        mine = {}
        for caption, rows in carriers.items():
            free = [i for i in rows if i not in mine]
            if caption and len(rows) >= 2 and free:
                mine[free[0]] = caption
        rest = [c for c in carriers if c not in mine.values()]
        # The row that keeps training: one carrying one of those captions if any (its own row, with one of them).
        free = sorted(sorted(i for i in cluster if i not in mine),
                      key=lambda i: not set(_captions_of(values, [i])) & set(rest))
        plain = {free[0]: rest} if rest and free else {}
        for i, trains in [*((i, [c]) for i, c in mine.items()), *plain.items()]:
            if _captions_of(values, [i]) != trains:
                captions[i] = trains
        copied.update(mine)
        copies.update({i: len(carriers[c]) for i, c in mine.items()})
        kept.extend([*mine, *plain])
    return AnchorPlan(copied, copies, captions, sorted(kept))


def anchor_captions(values: list, clusters: list[list[int]], copied: dict[int, str],
                    embed: Callable[[list[str]], Tensor], count: int) -> dict[int, list[str]]:
    """Each row of `copied` -> the `count` captions of images outside every cluster whose conditioning (`embed`: the
    text encoder's output, what the denoiser sees) is nearest to its copied caption's, by cosine: what the copied
    caption should mean, from the captions the model treats most alike (Kumari et al. 2023 anchor a copied caption to
    paraphrases)."""
    if not copied:
        return {}
    in_cluster = {i for cluster in clusters for i in cluster}
    candidates = [c for c in _captions_of(values, [i for i in range(len(values)) if i not in in_cluster])
                  if c and c not in set(copied.values())]
    if not candidates:
        raise ValueError("dedup_captions=anchor takes anchor captions from images outside the duplicate clusters, "
                         "and none has a caption of its own; use dedup_captions=empty or merge")
    embeddings = embed(list(copied.values()) + candidates)
    _, nearest = nearest_neighbours(embeddings[:len(copied)], embeddings[len(copied):], min(count, len(candidates)),
                                    metric="cosine")
    return {i: [candidates[j] for j in row] for i, row in zip(copied, nearest.tolist())}
