"""Forget mode's training data, in the order a run needs it: the prompts read and checked (before any rendering),
the checkpoint's renders split into reproductions and the rest, each reproducing prompt's anchor, the retained
prompts rendered."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from accelerate import PartialState
from accelerate.logging import get_logger

from ..config import EvalConfig, options_given
from ..data.detectors import Detector, load_detector
from ..draws import keyed_generator
from ..eval.detect import prompt_scores
from ..families.stable_diffusion import TextToImageTask
from . import NothingToForget
from .anchors import nearest, read_anchors, trigger_anchors
from .prompts import lowest_ranked, ranking, read_forget_prompts, read_lines
from .renders import ForgetSet, collapsed, render
from .verify import nearest_distances, reproduces

if TYPE_CHECKING:
    from ..config import MemmitConfig

logger = get_logger(__name__)
DETECT = EvalConfig.__dataclass_fields__  # the word-significance score uses memmit eval's detection defaults


def forget_prompts(cfg: MemmitConfig, task: TextToImageTask) -> tuple[list[str], Optional[dict[str, str]]]:
    """The prompts and the user's anchors (--anchor_prompts), checked before anything renders."""
    if not isinstance(task, TextToImageTask):
        raise ValueError(f"forget_prompts: {type(task.pipeline).__name__} is unconditional; forget mode mitigates "
                         "a text-to-image pipeline's prompts")
    prompts = read_forget_prompts(cfg.forget_prompts, cfg.forget_top, cfg.forget_min_score)
    for line, prompt in enumerate(prompts, 1):
        for tokenizer, length in zip(task.text.tokenizers, task.text.lengths()):
            if len(tokenizer(prompt, verbose=False).input_ids) > length:  # verbose: the warning is ours
                logger.warning(f"forget prompt {line} of {cfg.forget_prompts} ({prompt[:40]!r}...) is longer than "
                               f"{type(tokenizer).__name__}'s {length} tokens: it is truncated, as the pipeline "
                               "truncates it", main_process_only=True)
    anchors = (read_anchors(read_lines(cfg.anchor_prompts, "anchor_prompts"), prompts, cfg.anchor_prompts)
               if cfg.anchor_prompts else None)
    if cfg.retain_prompts:
        read_lines(cfg.retain_prompts, "retain_prompts")
    if options_given(cfg, ("retain_detected",)) and ranking(cfg.forget_prompts) is None:
        raise ValueError(f"retain_detected retains prompts of a detect_prompts.json, and forget_prompts "
                         f"{cfg.forget_prompts!r} is a list of prompts")
    return prompts, anchors


def neighbour_prompts(prompts: list[str], count: int, seed: int) -> list[str]:
    """`count` neighbours of each prompt: one of its words, drawn, replaced by another word of the prompts'
    vocabulary, drawn (prompt i's draws from the generator keyed (seed, i)); the prompts near the forgotten ones
    whose renders the model should keep. Fewer when the draws repeat."""
    vocabulary = sorted({w for p in prompts for w in p.split()})
    out = []
    for i, prompt in enumerate(prompts):
        words, g = prompt.split(), keyed_generator(seed, i)
        for _ in range(count):
            k = int(torch.randint(len(words), (), generator=g))
            others = [w for w in vocabulary if w != words[k]]
            if others:
                out.append(" ".join(words[:k] + [others[int(torch.randint(len(others), (), generator=g))]]
                                    + words[k + 1:]))
    return [p for p in dict.fromkeys(out) if p not in prompts]


def recombined_prompts(prompts: list[str], count: int, seed: int) -> list[str]:
    """Up to `count` new prompts made of the prompts' words by position: word j of a new prompt is word j of a
    prompt drawn for that position, its length a drawn prompt's. The forget prompts' words in new combinations: what
    the model should still render (a digit, a style, a name) once the combination it copies for is unlearned. Draws
    from the generator keyed (seed, 0, 1), a stream apart from neighbour_prompts' (seed, i); fewer prompts when the
    draws repeat (at most 4 * count draws)."""
    words, g = [p.split() for p in prompts], keyed_generator(seed, 0, 1)
    draw = lambda options: options[int(torch.randint(len(options), (), generator=g))]  # noqa: E731
    out: dict[str, None] = {}
    for _ in range(4 * count):
        if len(out) == count:
            break
        length = len(draw(words))
        out[" ".join(draw([w for w in words if len(w) > j])[j] for j in range(length))] = None
    return [p for p in out if p not in prompts]


def unlike(renders: list[np.ndarray], copies: np.ndarray, detector: Detector) -> list[int]:
    """The candidates none of whose renders reproduces one of the copies: training on the others would teach the
    copy back."""
    return [k for k, r in enumerate(renders) if not any(reproduces(r, copies, detector))]


def replace_copying_anchors(forget: ForgetSet, detector: Detector) -> None:
    """Each anchor left out of the retained prompts (its renders reproduce a copy) gives way to the retained prompt
    sharing the most words with its forget prompt, of those that tie the one whose renders lie furthest from the
    prompt's copies (on average): a tied prompt drawing a near-copy just outside the threshold pulled its forget
    prompt back onto the copy (EFFICACY.md). forget.replaced keeps the anchors replaced."""
    for prompt, anchor in forget.anchors.items():
        if anchor in forget.dropped and forget.retain_prompts:
            i = forget.prompts.index(prompt)
            copies = forget.renders[i][forget.copies[i]]
            forget.replaced[prompt] = anchor
            forget.anchors[prompt] = nearest(prompt, forget.retain_prompts, lambda k: float(
                nearest_distances(forget.retain_renders[k], copies, detector).mean()))


def build_forget_set(cfg: MemmitConfig, task: TextToImageTask, prompts: list[str], anchors: Optional[dict[str, str]],
                     device: torch.device, show_progress: bool = True) -> ForgetSet:
    """Render, split, anchor and render the retained prompts; every process renders its share and gets all."""
    state = PartialState()
    detector = load_detector(cfg.dedup_features, cfg.dedup_threshold, task.resolution, task.channels, device,
                             use="eval")
    renders = render(task, prompts, cfg.forget_samples, cfg.forget_inference_steps, cfg.eval_batch_size, cfg.seed,
                     device, show_progress, state)
    forget = ForgetSet(prompts, renders, [collapsed(r, detector, cfg.forget_share) for r in renders])
    reproducing = [prompts[i] for i in forget.reproducing]
    if not reproducing:
        raise NothingToForget(forget.summary())
    if anchors is not None:
        forget.anchors = {p: anchors[p] for p in reproducing}
    else:
        forget.anchors, forget.triggers = trigger_anchors(
            reproducing, lambda p: float(prompt_scores(task, [p], cfg.forget_inference_steps,
                                                       DETECT["detect_steps"].default, DETECT["detect_seeds"].default,
                                                       cfg.seed, cfg.eval_batch_size, device, show_progress=False)[0]))
    given = read_lines(cfg.retain_prompts, "retain_prompts") if cfg.retain_prompts else []
    # What the model should keep making: the anchors, the prompts it does not copy for, the user's (a file, and a
    # detection's lowest-ranked prompts), the forget prompts' neighbours (one word swapped) and their words
    # recombined, all but those whose renders reproduce a forget prompt's copy.
    detected = lowest_ranked(cfg.forget_prompts, prompts, cfg.retain_detected)
    candidates = [p for p in dict.fromkeys([*forget.anchors.values(), *forget.not_reproducing, *given, *detected,
                                            *neighbour_prompts(reproducing, cfg.retain_neighbours, cfg.seed),
                                            *recombined_prompts(reproducing, cfg.retain_recombined * len(reproducing),
                                                                cfg.seed)])
                  if p not in forget.anchors]
    # Seeds apart from the forget renders' (seed + 1): a retained prompt's renders do not share their noises.
    kept = render(task, candidates, cfg.retain_samples, cfg.forget_inference_steps, cfg.eval_batch_size,
                  cfg.seed + 1, device, show_progress, state)
    copies = np.concatenate([forget.renders[i][forget.copies[i]] for i in forget.reproducing])
    retained = unlike(kept, copies, detector)
    forget.retain_prompts = [candidates[k] for k in retained]
    forget.retain_renders = [kept[k] for k in retained]
    forget.dropped = [c for k, c in enumerate(candidates) if k not in retained]
    if anchors is None:  # a user's anchors are theirs
        replace_copying_anchors(forget, detector)
    logger.info(forget.summary(), main_process_only=True)
    return forget
