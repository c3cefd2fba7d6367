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


def anchored_copies(values: list, clusters: list[list[int]], embed: Callable[[list[str]], Tensor], count: int
                    ) -> dict[int, list[str]]:
    """dedup_captions=anchor: the kept copy (smallest id) of each cluster whose copies share one non-empty caption
    -> the `count` captions of images outside every cluster whose conditioning (`embed`: the text encoder's
    output, what the denoiser sees) is nearest to that caption's, by cosine: what the copied caption should mean,
    from the captions the model treats most alike (Kumari et al. 2023 anchor a copied caption to paraphrases)."""
    shared = {min(c): caps[0] for c in clusters if len(caps := _captions_of(values, sorted(c))) == 1 and caps[0]}
    if not shared:
        return {}
    in_cluster = {i for cluster in clusters for i in cluster}
    copied = set(shared.values())
    candidates = [c for c in _captions_of(values, [i for i in range(len(values)) if i not in in_cluster])
                  if c and c not in copied]
    if not candidates:
        raise ValueError("dedup_captions=anchor takes anchor captions from images outside the duplicate clusters, "
                         "and none has a caption of its own; use dedup_captions=empty or merge")
    embeddings = embed(list(shared.values()) + candidates)
    _, nearest = nearest_neighbours(embeddings[:len(shared)], embeddings[len(shared):], min(count, len(candidates)),
                                    metric="cosine")
    return {i: [candidates[j] for j in row] for i, row in zip(shared, nearest.tolist())}
