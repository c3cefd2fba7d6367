"""Anchor prompts without a language model: a reproducing prompt's anchor is the prompt without its trigger words.

A word's significance is the drop of the prompt's memorization score (Wen et al. 2024, eval/detect.py) when the word
is left out; the trigger words are those whose drop is at least TRIGGER_SHARE of the largest drop (the words that
carry the copy, where the rest say what the picture shows). A prompt no word's absence lowers is its own trigger:
its anchor is the empty prompt.

An anchor whose renders still reproduce a copy would teach the copy back (the anchored rows train the forget prompt
towards the model's prediction under its anchor): it is replaced by the retained prompt (one that renders no copy)
sharing the most words with the forget prompt, of those that tie the one whose renders lie furthest from the copy
(build.replace_copying_anchors). Shorter anchors made of the prompt's own words were measured and lost: on a
checkpoint that copies hard, "handwritten", "a handwritten" and the empty prompt draw copies too, and several forget
prompts pulled towards one generic anchor copied more (EFFICACY.md)."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

TRIGGER_SHARE = 0.5


def leave_one_out(prompt: str) -> list[str]:
    """The prompt without each of its (whitespace-separated) words in turn."""
    words = prompt.split()
    return [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]


def tidy(words: list[str]) -> str:
    """Words joined, without the punctuation a removed neighbour leaves dangling at either end."""
    return " ".join(words).strip(" ,;:")


def trigger_anchors(prompts: list[str], score: Callable[[str], float]) -> tuple[dict[str, str], dict[str, list[dict]]]:
    """Each prompt's anchor, and each word's score drop. `score` scores one prompt from the same starting noises
    whatever the prompt, so a prompt and its variants are compared on equal terms."""
    anchors, words_of = {}, {}
    for prompt in prompts:
        base = score(prompt)
        drops = [base - score(variant) for variant in leave_one_out(prompt)]
        top = max(drops, default=0.0)
        words = prompt.split()
        trigger = [d > 0 and d >= TRIGGER_SHARE * top for d in drops]
        anchors[prompt] = tidy([w for w, t in zip(words, trigger) if not t]) if top > 0 else ""
        words_of[prompt] = [{"word": w, "score_drop": d, "trigger": t} for w, d, t in zip(words, drops, trigger)]
    return anchors, words_of


def nearest(prompt: str, options: list[str], apart: Optional[Callable[[int], float]] = None) -> str:
    """The option sharing the most words (counted with repeats) with the prompt; of those that tie, the one `apart`
    (option index -> its distance from what the prompt copies) puts furthest, else the first."""
    words = Counter(prompt.split())
    shared = [sum((words & Counter(option.split())).values()) for option in options]
    tied = [k for k, count in enumerate(shared) if count == max(shared)]
    return options[tied[0] if apart is None or len(tied) == 1 else max(tied, key=apart)]


def read_anchors(lines: list[str], prompts: list[str], path: str) -> dict[str, str]:
    """--anchor_prompts: line i is the anchor of forget prompt i."""
    if len(lines) != len(prompts):
        raise ValueError(f"anchor_prompts {path!r} holds {len(lines)} anchors for {len(prompts)} forget prompts "
                         "(one line per forget prompt, in its order)")
    return dict(zip(prompts, lines))
