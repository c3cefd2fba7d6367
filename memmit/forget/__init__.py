"""Forget mode (`--forget_prompts`): mitigate a checkpoint from the prompts it reproduces, with no training image.

The training set is made from the checkpoint itself (renders.py): each prompt is rendered from many seeds, and the
renders that collapse onto one image are its reproductions. Each reproduction trains as an anchored copy does under
`dedup_captions=anchor` (weighted `--forget_anchor_weight`): the prompt's prediction on the copy's noised latents is
pulled towards the model's own, gradient-stopped prediction for the prompt's anchor (anchors.py: the prompt without
its trigger words, or the nearest retained prompt when that anchor draws a copy too). The anchors, the prompts that
do not reproduce, `--retain_prompts`, and the forget prompts' neighbours and words recombined (build.py) are rendered
too and train as ordinary rows, so the model keeps what it makes of them: without that breadth the run forgets how to
draw what its prompts name (EFFICACY.md).
"""


class NothingToForget(Exception):
    """No forget prompt reproduces an image: the run trains nothing and writes no model (exit 0)."""
