"""Forget mode (`--forget_prompts`): a checkpoint mitigated from its prompts, with no training image, on tiny real
pipelines: the prompt files, the split of renders into reproductions, the trigger-word anchors, and the run."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import PartialState

from memmit.card import write_model_card
from memmit.cli import main, run
from memmit.config import parse_args
from memmit.data.captions import ANCHORS
from memmit.data.detectors import PixelDetector
from memmit.data.features import Extractor
from memmit.eval.detect import prompt_scores
from memmit.forget.anchors import TRIGGER_SHARE, leave_one_out, nearest, trigger_anchors
from memmit.forget.build import (forget_prompts, neighbour_prompts, recombined_prompts, replace_copying_anchors,
                                 unlike)
from memmit.forget.prompts import lowest_ranked, read_forget_prompts
from memmit.forget.renders import ForgetSet, collapsed, render, to_pil
from memmit.forget.verify import (VARIANTS, load_references, prompt_variants, reproduces, retained_quality, spread,
                                   verification_table, verify, verify_run)
from memmit.families import load_task

from conftest import mnist_images, reset_accelerator
from test_text_to_image import generators, make_task, reference_loss, rows

PROMPTS = ["a handwritten seven, bold", "the number 3", "digit 1 written by hand"]


def detect_json(path, rows) -> str:
    path.write_text(json.dumps({"method": "...", "prompts": [{"prompt": p, "score": s} for p, s in rows]}))
    return str(path)


def test_prompt_files_lines_or_ranked_detection(tmp_path):
    lines = tmp_path / "prompts.txt"
    lines.write_text("  first prompt \n\nsecond\nfirst prompt\nthird\n")
    assert read_forget_prompts(str(lines)) == ["first prompt", "second", "third"]
    assert read_forget_prompts(str(lines), top=2) == ["first prompt", "second"]
    ranked = detect_json(tmp_path / "detect_prompts.json", [("a", 9.0), ("b", 5.0), ("c", 1.0)])
    assert read_forget_prompts(ranked) == ["a", "b", "c"]
    assert read_forget_prompts(ranked, min_score=5.0) == ["a", "b"]
    assert read_forget_prompts(ranked, top=1, min_score=0.5) == ["a"]
    # Retained from a ranking: its lowest scores first, none of those taken; none from a list of prompts.
    unsorted = detect_json(tmp_path / "unsorted.json", [("a", 9.0), ("c", 1.0), ("d", 0.5), ("b", 5.0)])
    assert lowest_ranked(unsorted, ["a"], 2) == ["d", "c"] and lowest_ranked(unsorted, ["a"], 9) == ["d", "c", "b"]
    assert lowest_ranked(unsorted, ["a", "d"], 0) == [] and lowest_ranked(str(lines), ["first prompt"], 9) == []


@pytest.mark.parametrize("content, kwargs, message", [
    (None, {}, "forget_prompts 'PATH' cannot be read"),
    ("\n  \n", {}, "forget_prompts 'PATH' holds no prompt"),
    ("a prompt\n", {"min_score": 1.0}, "forget_min_score reads the scores of a detect_prompts.json"),
    ('{"prompts": [{"prompt": "a"}]}', {}, "is JSON but not `memmit eval --detect_prompts`' detect_prompts.json"),
    ('{"prompts": [{"prompt": "a", "score": 0.5}]}', {"min_score": 2.0},
     "no prompt of forget_prompts 'PATH' scores >= forget_min_score=2.0 (the highest scores 0.5)"),
])
def test_bad_prompt_files_are_named(tmp_path, content, kwargs, message):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as err:
        read_forget_prompts(str(path), **kwargs)
    assert message.replace("PATH", str(path)) in str(err.value)


def test_trigger_words_are_those_whose_absence_drops_the_score_most():
    # A written-out score: 10 for "bold" present, 4 for "seven", 1 for "handwritten"; the rest count nothing.
    weights = {"bold": 10.0, "seven,": 4.0, "handwritten": 1.0}

    def score(prompt):
        return sum(weights.get(w, 0.0) for w in prompt.split())

    anchors, words = trigger_anchors(["a handwritten seven, bold", "plain words", "handwritten bold"], score)
    # Drops 0, 1, 4, 10: only "bold" reaches half the largest drop; "seven," is left, its comma tidied.
    assert anchors["a handwritten seven, bold"] == "a handwritten seven"
    assert [w["trigger"] for w in words["a handwritten seven, bold"]] == [False, False, False, True]
    assert [w["score_drop"] for w in words["a handwritten seven, bold"]] == [0.0, 1.0, 4.0, 10.0]
    assert anchors["plain words"] == ""  # no word's absence lowers the score: the prompt is its own trigger
    assert anchors["handwritten bold"] == "handwritten"
    assert leave_one_out("a b c") == ["b c", "a c", "a b"]


def test_an_anchor_that_renders_a_copy_gives_way_to_the_nearest_retained_prompt(tmp_path):
    renders = [np.full((2, 4, 4, 1), k, np.uint8) for k in range(3)]
    forget = ForgetSet(["a seven, bold, tall", "a three, thin", "a one"], renders, [[0, 1]] * 3,
                       anchors={"a seven, bold, tall": "a tall", "a three, thin": "thin", "a one": "a"},
                       retain_prompts=["thin", "a four, bold, tall", "a seven, bold, wide", "a seven, thin, tall"],
                       retain_renders=[renders[0]] * 4, dropped=["a tall", "a", "a three, thick"])
    replace_copying_anchors(forget, PixelDetector(0.3, 4, 1))
    # Flat renders are all equally far from the copies (the detector sees no contrast), so ties go to the first.
    # "a tall" copies: the last three retained prompts share 3 words each with "a seven, bold, tall", the first of
    # them wins; "thin" renders no copy and stays. "a one" shares 1 word ("a") with each of the last three.
    assert forget.anchors == {"a seven, bold, tall": "a four, bold, tall", "a three, thin": "thin",
                              "a one": "a four, bold, tall"}
    assert forget.replaced == {"a seven, bold, tall": "a tall", "a one": "a"}
    assert nearest("x y y", ["y", "y y z", "x"]) == "y y z"  # words counted with repeats
    # forget.json says which anchor copied, and a resumed run reads it back.
    forget.write(tmp_path, {"k": 1})
    assert [r["anchor_reproducing"] for r in json.loads((tmp_path / "forget.json").read_text())["prompts"]] == [
        "a tall", None, "a"]
    assert ForgetSet.stored(tmp_path, {"k": 1}, forget.prompts).replaced == forget.replaced
    # A run started before anchors were replaced resumes with its anchors as they were.
    report = json.loads((tmp_path / "forget.json").read_text())
    for row in report["prompts"]:
        del row["anchor_reproducing"]
    (tmp_path / "forget.json").write_text(json.dumps(report))
    older = ForgetSet.stored(tmp_path, {"k": 1}, forget.prompts)
    assert older.replaced == {} and older.anchors == forget.anchors


def test_of_retained_prompts_tied_on_words_the_anchor_is_the_one_drawing_furthest_from_the_copy():
    images, _ = mnist_images(4)
    digits = [np.asarray(img.convert("L").resize((16, 16)))[..., None] for img in images]
    rng = np.random.RandomState(0)
    near = np.clip(digits[0].astype(int) + rng.randint(-40, 41, digits[0].shape), 0, 255).astype(np.uint8)
    forget = ForgetSet(["a seven, bold, tall"], [np.stack([digits[0]] * 2)], [[0, 1]],
                       anchors={"a seven, bold, tall": "tall"}, dropped=["tall"],
                       retain_prompts=["a seven, bold, wide", "a seven, thin, tall", "bold"],
                       retain_renders=[np.stack([near, digits[1]]), np.stack([digits[2], digits[3]]),
                                       np.stack([digits[1]] * 2)])
    detector = PixelDetector(0.3, 16, 1)
    mean_distance = lambda r: float(detector.distance(detector.features([to_pil(x) for x in r]),
                                                      detector.features([to_pil(digits[0])] * len(r))).mean())
    assert mean_distance(forget.retain_renders[0]) < mean_distance(forget.retain_renders[1])
    replace_copying_anchors(forget, detector)
    # The first two share 3 words each; the second's renders lie further from the copy (the first draws a
    # near-copy), so it wins though it comes second.
    assert forget.anchors == {"a seven, bold, tall": "a seven, thin, tall"}
    assert nearest("x y", ["x a", "y b", "z"], apart=[0.1, 0.5, 9.0].__getitem__) == "y b"
    assert nearest("x y", ["x a", "y b", "x y"], apart=[0.1, 0.5, 0.0].__getitem__) == "x y"  # no tie


def test_renders_that_collapse_onto_one_image_are_the_copies():
    images, _ = mnist_images(4)
    digits = [np.asarray(img.convert("L").resize((16, 16)))[..., None] for img in images]
    rng = np.random.RandomState(0)
    noisy = lambda x: np.clip(x.astype(int) + rng.randint(-3, 4, x.shape), 0, 255).astype(np.uint8)
    # Renders 0, 2, 3, 5 are one digit under pixel noise; 1 and 4 other digits.
    renders = np.stack([noisy(digits[0]), digits[1], noisy(digits[0]), noisy(digits[0]), digits[2], noisy(digits[0])])
    detector = PixelDetector(0.3, 16, 1)
    assert collapsed(renders, detector, 0.5) == [0, 2, 3, 5]
    assert collapsed(renders, detector, 0.7) == []  # 4 of 6 renders is less than the share asked for


def test_neighbours_swap_one_word_for_another_of_the_prompts_words():
    prompts = ["a handwritten seven, bold", "the number 3"]
    near = neighbour_prompts(prompts, 6, seed=0)
    vocabulary = {w for p in prompts for w in p.split()}
    assert near == neighbour_prompts(prompts, 6, seed=0) and near != neighbour_prompts(prompts, 6, seed=1)
    assert 0 < len(near) <= 12 and len(set(near)) == len(near) and not set(near) & set(prompts)
    for n in near:
        # Its prompt: the one of the same length differing from it in exactly one word, a vocabulary word.
        diffs = [[(a, b) for a, b in zip(p.split(), n.split()) if a != b] for p in prompts
                 if len(p.split()) == len(n.split())]
        assert any(len(d) == 1 and d[0][1] in vocabulary for d in diffs)
    assert neighbour_prompts(prompts, 0, seed=0) == []


def test_recombined_prompts_take_each_position_s_word_from_a_forget_prompt():
    prompts = ["a handwritten seven, bold, tall", "a handwritten three, thin, wide", "the number 3"]
    mixed = recombined_prompts(prompts, 12, seed=0)
    assert mixed == recombined_prompts(prompts, 12, seed=0) and mixed != recombined_prompts(prompts, 12, seed=1)
    assert 0 < len(mixed) <= 12 and len(set(mixed)) == len(mixed) and not set(mixed) & set(prompts)
    for m in mixed:
        words = m.split()
        assert len(words) in {len(p.split()) for p in prompts}
        # Word j is word j of some forget prompt.
        assert all(any(len(p.split()) > j and p.split()[j] == w for p in prompts) for j, w in enumerate(words))
    assert recombined_prompts(prompts, 0, seed=0) == []


def test_retain_candidates_whose_renders_reproduce_a_copy_are_left_out():
    images, _ = mnist_images(4)
    digits = [np.asarray(img.convert("L").resize((16, 16)))[..., None] for img in images]
    copies = np.stack([digits[0], digits[0]])
    candidates = [np.stack([digits[1], digits[2]]), np.stack([digits[3], np.roll(digits[0], 1, axis=0)]),
                  np.stack([digits[2]])]
    assert unlike(candidates, copies, PixelDetector(0.3, 16, 1)) == [0, 2]


def test_the_forget_set_trains_reproductions_anchored_and_retained_renders_as_they_are():
    renders = [np.full((3, 4, 4, 1), k, dtype=np.uint8) for k in range(2)]
    forget = ForgetSet(["copied", "novel"], renders, [[0, 2], []], anchors={"copied": "anchor"},
                       retain_prompts=["anchor", "novel"], retain_renders=[renders[0][:1], renders[1][:2]])
    ds, anchors = forget.dataset("image", "text")
    assert ds["text"] == ["copied", "copied", "anchor", "novel", "novel"]
    assert anchors == {0: ["anchor"], 1: ["anchor"]}
    assert forget.not_reproducing == ["novel"] and forget.reproducing == [0]


def test_retained_rows_distil_the_frozen_input_model_and_anchored_rows_their_anchor(tiny_sd_pipeline,
                                                                                      captioned_digits_dir):
    """retain_distill: a row that is not anchored trains towards the teacher's prediction for its own noised
    latent, timestep and caption; an anchored row still towards the model's own prediction under its anchor."""
    task = make_task(tiny_sd_pipeline, captioned_digits_dir)
    task.denoiser.requires_grad_(False)
    batch = rows(captioned_digits_dir, 6)
    batch[ANCHORS] = [["the number 3"], [], [], ["digit 1"], [], []]
    inputs = task.inputs(batch, generators(1, 6))
    plain = task.per_sample_loss(task.denoiser, inputs, generators(2, 6), torch.device("cpu")).losses
    task.teacher = copy.deepcopy(task.denoiser)
    with torch.no_grad():  # a teacher unlike the trained model, so its targets show
        for p, g in zip(task.teacher.parameters(), generators(3, 10**4)):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = task.per_sample_loss(task.denoiser, inputs, generators(2, 6), torch.device("cpu"))
    expected = reference_loss(tiny_sd_pipeline, inputs, seed=2, teacher=task.teacher)[0]
    torch.testing.assert_close(out.losses, expected)
    torch.testing.assert_close(out.losses[out.anchored], plain[out.anchored])
    assert not torch.allclose(out.losses[~out.anchored], plain[~out.anchored])
    # The teacher is the trained model itself: every retained row's loss is exactly 0.
    task.teacher = task.denoiser
    out = task.per_sample_loss(task.denoiser, inputs, generators(2, 6), torch.device("cpu"))
    assert (out.losses[~out.anchored] == 0).all() and (out.losses[out.anchored] > 0).all()


def train_args(pipe: str, prompts, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", pipe, "--forget_prompts", str(prompts), "--output_dir", str(out),
            "--forget_samples", "4", "--forget_inference_steps", "2", "--retain_samples", "2", "--num_rounds", "1",
            "--local_steps", "2", "--train_batch_size", "4", "--num_validation_images", "0", "--report_to", "none",
            "--eval_batch_size", "8", *map(str, extra)]


def assert_trigger_anchors(report: dict, task) -> None:
    """The report's anchors are its prompts without their trigger words, from the pipeline's own scores of each
    prompt and of it with each word left out (2 sampling steps, the first scored, 4 noises, seed 0)."""
    for row in report["prompts"]:
        score = lambda p: float(prompt_scores(task, [p], 2, 1, 4, 0, 8, torch.device("cpu"), False)[0])
        drops = [score(row["prompt"]) - score(v) for v in leave_one_out(row["prompt"])]
        trigger = [d > 0 and d >= TRIGGER_SHARE * max(drops) for d in drops]
        assert [w["score_drop"] for w in row["words"]] == pytest.approx(drops, rel=1e-5)
        expected = " ".join(w for w, t in zip(row["prompt"].split(), trigger) if not t).strip(" ,;:")
        assert row["anchor"] == (expected if max(drops) > 0 else "")


def test_a_forget_run_renders_splits_anchors_and_trains(tiny_sd_pipeline, tmp_path):
    # A detection's ranking: its three highest are forgotten, its lowest retained.
    lowest = ["a photo of a cat", "digit 5"]
    prompts = detect_json(tmp_path / "detect_prompts.json", [*zip(PROMPTS, (9.0, 8.0, 7.0)), (lowest[1], 1.0),
                                                              (lowest[0], 0.5)])
    out = tmp_path / "out"
    # Every render is within the threshold of every other (pixels RMS is at most 2): every prompt reproduces.
    trainer = run(parse_args(train_args(tiny_sd_pipeline, prompts, out, "--dedup_threshold", 2.0, "--forget_top", 3)))
    report = json.loads((out / "memmit" / "forget" / "forget.json").read_text())
    assert [r["collapsed_renders"] for r in report["prompts"]] == [[0, 1, 2, 3]] * 3
    task = load_task(parse_args(train_args(tiny_sd_pipeline, prompts, out, "--caption_column", "text")))
    assert_trigger_anchors(report, task)
    anchors = [r["anchor"] for r in report["prompts"]]
    # Every render is within the threshold of every copy: each retain candidate (the anchors, the ranking's
    # lowest, the neighbours, the words recombined) would teach a copy back, and is left out.
    candidates = [a for a in dict.fromkeys(anchors + lowest + neighbour_prompts(PROMPTS, 8, 0)
                                           + recombined_prompts(PROMPTS, 32 * 3, 0)) if a not in PROMPTS]
    assert report["retain_prompts"] == [] and report["retain_dropped_as_reproducing"] == candidates
    assert sorted(p.name for p in (out / "memmit" / "forget" / "references").iterdir()) == sorted(
        f"{i}-{j}.png" for i in range(3) for j in range(4))
    # The training set: the 12 reproductions, each anchored to its prompt's anchor.
    assert trainer.dataset["text"] == [p for p in PROMPTS for _ in range(4)]
    assert trainer.split.anchors == {i: [anchors[i // 4]] for i in range(12)}
    assert trainer.cfg.agc_lambda == 0.0  # AGC off: the renders are all the model's own
    assert trainer.task.anchor_weight == trainer.cfg.forget_anchor_weight == 2.0  # not dedup_anchor_weight's 16
    # retain_distill: the teacher is the input's UNet, frozen, where the trained one moved.
    from safetensors.torch import load_file
    given = load_file(Path(tiny_sd_pipeline) / "unet" / "diffusion_pytorch_model.safetensors")
    teacher = trainer.task.teacher.state_dict()
    trained = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(teacher[k], v) for k, v in given.items())
    assert not all(torch.equal(trained[k], v) for k, v in given.items())
    assert not any(p.requires_grad for p in trainer.task.teacher.parameters())
    assert (out / "model_index.json").is_file()
    card = (out / "README.md").read_text()
    assert "fine-tuned on its own renders of prompts it reproduced" in card and "**Forget mode**" in card
    assert "other prompts held to the input model's predictions (distilled)" in card
    assert "Near-duplicate training images" not in card
    # The reproductions are the pipeline's renders of their prompt at the run's seed, keyed per render.
    again = render(task, PROMPTS[:1], 4, 2, 3, 0, torch.device("cpu"), False)[0]
    assert np.array_equal(np.asarray(trainer.dataset[0]["image"]).reshape(again[0].shape), again[0])


def test_a_flow_matching_pipeline_forgets_towards_the_users_anchors_or_its_trigger_words(tiny_sd3_pipeline, tmp_path):
    prompts, anchors = tmp_path / "prompts.txt", tmp_path / "anchors.txt"
    prompts.write_text("\n".join(PROMPTS[:2]))
    anchors.write_text("a handwritten seven\na number\n")
    out = tmp_path / "out"
    trainer = run(parse_args(train_args(tiny_sd3_pipeline, prompts, out, "--dedup_threshold", 2.0, "--anchor_prompts",
                                        anchors, "--resolution", 16, "--center_crop", "--no-retain_distill")))
    assert trainer.task.teacher is None  # no copy of the input's denoiser kept
    report = json.loads((out / "memmit" / "forget" / "forget.json").read_text())
    assert [(r["prompt"], r["anchor"], r["words"]) for r in report["prompts"]] == [
        (PROMPTS[0], "a handwritten seven", []), (PROMPTS[1], "a number", [])]
    assert trainer.split.anchors == {i: [["a handwritten seven", "a number"][i // 4]] for i in range(8)}
    assert (out / "model_index.json").is_file()
    # Without them, the trigger words come from the flow-matching version of the memorization score.
    found = tmp_path / "found"
    run(parse_args(train_args(tiny_sd3_pipeline, prompts, found, "--dedup_threshold", 2.0, "--resolution", 16,
                              "--center_crop")))
    report = json.loads((found / "memmit" / "forget" / "forget.json").read_text())
    assert all(len(r["words"]) == len(r["prompt"].split()) for r in report["prompts"])
    assert_trigger_anchors(report, load_task(parse_args(train_args(tiny_sd3_pipeline, prompts, found, "--resolution",
                                                                   16, "--caption_column", "text"))))


def test_prompts_that_do_not_reproduce_train_nothing_and_write_nothing(tiny_sd_pipeline, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "out"
    assert main(["train", *train_args(tiny_sd_pipeline, prompts, out, "--dedup_threshold", 0.0)]) == 0
    printed = capsys.readouterr().out
    assert "0 of 3 forget prompts reproduce" in printed and "nothing trained, no model written" in printed
    assert not out.exists()


def test_a_prompt_longer_than_the_tokenizer_is_said_to_be_truncated(tiny_sd_pipeline, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("short\n" + " ".join(["word"] * 20) + "\n")  # 100 byte tokens, of 77
    cfg = parse_args(train_args(tiny_sd_pipeline, prompts, tmp_path / "out", "--caption_column", "text"))
    PartialState()  # as the run's accelerator would: the warning goes through accelerate's logger
    with caplog.at_level(logging.WARNING):
        task = load_task(cfg)
        assert forget_prompts(cfg, task)[0][0] == "short"
    assert "forget prompt 2 of" in caplog.text and "it is truncated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # said once: the renders do not repeat the pipeline's warning each batch
        render(task, [" ".join(["word"] * 20)], 2, 1, 1, 0, torch.device("cpu"), False)
    assert "truncated" not in caplog.text


@pytest.mark.parametrize("pipe, extra, message", [
    ("sd", ["--forget_prompts", "missing.txt"], "forget_prompts 'missing.txt' cannot be read"),
    ("sd", ["--dataset_name", "DATA"], "dataset_name: options of training images"),
    ("sd", ["--dedup", "none", "--label_column", "label"], "label_column, dedup: options of training images"),
    ("sd", ["--evaluate", "--export", "lora", "--lora_rank", "4"], "--evaluate needs --export full"),
    ("sd", ["--anchor_prompts", "PROMPTS2"], "anchor_prompts 'PROMPTS2' holds 1 anchors for 3 forget prompts"),
    ("sd", ["--forget_share", "1.5"], "forget_share must be in (0, 1]"),
    ("sd", ["--retain_recombined", "-1"], "retain_recombined must be >= 0"),
    ("sd", ["--retain_detected", "-1"], "retain_detected must be >= 0"),
    ("sd", ["--retain_detected", "8"], "retain_detected retains prompts of a detect_prompts.json, and forget_prompts"),
    ("sd", ["--forget_anchor_weight", "0"], "forget_anchor_weight must be > 0"),
    ("sd", ["--verify_retained", "-1"], "verify_retained must be >= 0"),
    ("sd", ["--dedup_anchor_weight", "8"], "forget mode's reproductions take --forget_anchor_weight"),
    ("sd", ["--agc_lambda", "0.5"], "agc_lambda > 0 with retain_distill"),
    ("sd", ["--evaluate", "--eval_quality_extractor", "no-such.pt"],
     "eval_quality_extractor: 'no-such.pt' does not exist"),
    ("ddpm", [], "is unconditional"),
])
def test_bad_forget_input_is_named_before_anything_renders(tiny_sd_pipeline, tiny_pipeline,
                                                           captioned_digits_dir, tmp_path, capsys, pipe, extra,
                                                           message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    (tmp_path / "anchors.txt").write_text("one anchor\n")
    extra = [{"PROMPTS2": str(tmp_path / "anchors.txt"), "DATA": captioned_digits_dir}.get(a, a) for a in extra]
    path = {"sd": tiny_sd_pipeline, "ddpm": tiny_pipeline}[pipe]
    out = tmp_path / "out"
    assert main(["train", *train_args(path, prompts, out), *extra]) == 2
    assert message.replace("PROMPTS2", str(tmp_path / "anchors.txt")) in capsys.readouterr().err
    assert not out.exists()


def test_forget_options_without_forget_prompts_are_refused(captioned_digits_dir, tiny_sd_pipeline, tmp_path, capsys):
    assert main(["train", "--pretrained_model_name_or_path", tiny_sd_pipeline, "--dataset_name", captioned_digits_dir,
                 "--caption_column", "text", "--forget_top", "3", "--output_dir", str(tmp_path / "out")]) == 2
    assert "forget_top: options of --forget_prompts, which is not given" in capsys.readouterr().err


def test_prompt_variants_are_small_deterministic_changes():
    assert prompt_variants("a handwritten seven, bold") == {
        "held-out seeds": "a handwritten seven, bold", "word added": "a handwritten seven, bold picture",
        "word removed": "a handwritten seven,", "typo": "a hnadwritten seven, bold",
        "template": "an image of a handwritten seven, bold"}
    assert list(prompt_variants("x")) == list(VARIANTS)


def test_a_render_reproduces_when_it_lies_within_the_threshold_of_a_reference():
    images, _ = mnist_images(3)
    digits = np.stack([np.asarray(img.convert("L").resize((16, 16)))[..., None] for img in images])
    shifted = np.roll(digits[0], 1, axis=1)  # one pixel across: the pixel detector aligns it
    assert reproduces(np.stack([shifted, digits[2]]), digits[:2], PixelDetector(0.3, 16, 1)) == [True, False]


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """The FID formula written out with scipy's matrix square root."""
    from scipy.linalg import sqrtm

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * sqrtm(s_a @ s_b).real))


class Stats(torch.nn.Module):
    """Three statistics of an image: a low-dimensional embedding whose covariance the few test renders can fit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, :, :8].mean((1, 2, 3))], 1)


STATS = Extractor({"kind": "stats"}, Stats())


def stats(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float64) / 255
    return np.stack([x.mean((1, 2, 3)), x.std((1, 2, 3), ddof=1), x[:, :8].mean((1, 2, 3))], 1)


def test_the_verification_spreads_its_retained_prompts_over_their_list():
    assert spread(list(range(10)), 4) == [0, 2, 5, 7]  # k * 10 // 4
    assert spread(list(range(3)), 3) == spread(list(range(3)), 0) == spread(list(range(3)), 8) == [0, 1, 2]


def test_retained_quality_is_the_frechet_distance_to_the_input_renders_of_the_other_seeds():
    rng = np.random.default_rng(0)
    before = [rng.integers(0, 256, (6, 16, 16, 1), dtype=np.uint8) for _ in range(3)]
    after = [np.clip(r.astype(int) + rng.integers(0, 60, r.shape), 0, 255).astype(np.uint8) for r in before]
    quality = retained_quality(before, after, STATS, 4)
    reference = stats(np.concatenate([r[3:] for r in before]))
    for label, renders in (("before", before), ("after", after)):
        expected = fid(stats(np.concatenate([r[:3] for r in renders])), reference)
        assert quality[label] == {"available": True, "extractor": {"kind": "stats"},
                                  "frechet_distance": pytest.approx(expected, rel=1e-6, abs=1e-9)}
    assert quality["after"]["frechet_distance"] > quality["before"]["frechet_distance"]  # brightened: moved away
    # One render a side cannot be fitted: said, not computed.
    assert retained_quality([r[:2] for r in before[:1]], [r[:2] for r in after[:1]], STATS, 4)["after"] == {
        "available": False, "reason": "1 render(s) in each half of the seeds"}


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")  # the quality extractor's format
def test_evaluate_verifies_a_forget_run_on_new_seeds_and_prompt_variants(tiny_sd_pipeline, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]))
    out = tmp_path / "out"
    assert main(["train", *train_args(tiny_sd_pipeline, prompts, out, "--dedup_threshold", 2.0, "--evaluate",
                                      "--learning_rate", 1e-2)]) == 0
    result = json.loads((out / "memmit" / "forget" / "verify.json").read_text())
    assert list(result["summary"]) == list(VARIANTS) and set(result["prompts"]) == set(PROMPTS[:2])
    assert result["prompts"][PROMPTS[0]]["typo"]["prompt"] == prompt_variants(PROMPTS[0])["typo"]
    # Every render is within a threshold of 2 of every reference: all reproduce, before and after.
    assert all(row == {"before": 1.0, "after": 1.0} for row in result["summary"].values())
    # Every retain candidate reproduced a copy too (threshold 2): none retained, no change to report.
    assert result["retained"] == {"prompts": [], "mean_pixel_change": None, "share_reproducing_a_reference": None,
                                  "frechet_to_input": None}
    # verify() of retained prompts: their renders by both pipelines, same seeds (seed + 2), written out.
    kept = ["the number 7", "a digit"]
    before = load_task(parse_args(train_args(tiny_sd_pipeline, prompts, out, "--caption_column", "text")))
    after = load_task(parse_args(train_args(str(out), prompts, tmp_path / "x", "--caption_column", "text")))
    report = json.loads((out / "memmit" / "forget" / "forget.json").read_text())
    refs = load_references(out / "memmit" / "forget" / "references", report, before.channels)
    direct = verify(before, after, {**report, "retain_prompts": kept}, refs, PixelDetector(0.3, 16, 1), 4, 2, 8, 0,
                    torch.device("cpu"), False, STATS)
    renders = {t: render(task, kept, 4, 2, 8, 2, torch.device("cpu"), False)
               for t, task in (("before", before), ("after", after))}
    a, b = (np.concatenate(renders[t]).astype(float) / 127.5 for t in ("before", "after"))
    per_render = np.sqrt(((a - b) ** 2).reshape(len(kept), 4, -1).mean(axis=2)).mean(axis=1)
    assert direct["retained"]["mean_pixel_change"] == pytest.approx(per_render.mean(), rel=1e-6)
    assert direct["retained"]["mean_pixel_change"] > 0  # lr 1e-2 moved the model
    # Their quality: seeds 1-2 of each prompt against the input's seeds 3-4, in the quality extractor's embedding.
    reference = stats(np.concatenate([r[2:] for r in renders["before"]]))
    for label, rows in renders.items():
        assert direct["retained"]["frechet_to_input"][label]["frechet_distance"] == pytest.approx(
            fid(stats(np.concatenate([r[:2] for r in rows])), reference), rel=1e-4, abs=1e-8)
    assert "retained prompts: Fréchet distance to the input's renders of other seeds (stats)" in verification_table(
        direct)
    # A run's verification takes --eval_quality_extractor: the same statistics as a TorchScript file.
    scripted = tmp_path / "stats.pt"
    torch.jit.script(Stats()).save(str(scripted))
    (out / "memmit" / "forget" / "forget.json").write_text(json.dumps({**report, "retain_prompts": kept}))
    cfg = parse_args(train_args(tiny_sd_pipeline, prompts, out, "--caption_column", "text", "--eval_quality_extractor",
                                scripted))
    ran = verify_run(cfg, out, torch.device("cpu"), False)["retained"]["frechet_to_input"]
    for label in ("before", "after"):
        assert ran[label]["extractor"] == {"kind": "torchscript", "path": str(scripted)}
        assert ran[label]["frechet_distance"] == pytest.approx(
            direct["retained"]["frechet_to_input"][label]["frechet_distance"], rel=1e-5)
    # verify_retained 1: the first retained prompt alone (spread) is rendered.
    cfg = parse_args(train_args(tiny_sd_pipeline, prompts, out, "--caption_column", "text", "--verify_retained", 1))
    assert verify_run(cfg, out, torch.device("cpu"), False)["retained"]["prompts"] == kept[:1]
    (out / "memmit" / "forget" / "verify.json").write_text(json.dumps(direct))
    write_model_card(out, parse_args(train_args(tiny_sd_pipeline, prompts, out)).to_dict(), tiny_sd_pipeline, None)
    assert "2 retained prompts' renders changed by" in (out / "README.md").read_text()
    assert "their Fréchet distance to the input's renders of other seeds (stats)" in (out / "README.md").read_text()
    printed = capsys.readouterr().out
    assert "forget prompts before and after" in printed and "word removed" in printed
    assert "## Forget prompts before and after" in (out / "README.md").read_text()


@pytest.mark.slow  # ~40 s of launched processes
def test_two_processes_render_their_share_and_forget_as_one(tiny_sd_pipeline, tmp_path):
    """Forget mode under accelerate launch: each process renders a share of the forget and retain renders (keyed
    per prompt and seed, so the split is the one process's), and K = 1 on two processes, each half of every
    micro-batch, trains what one process with the whole micro-batch trains."""
    import subprocess

    from safetensors.torch import load_file

    from test_multiprocess import ROOT, accelerate_launch, launch_env

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    for processes, batch in ((1, "4"), (2, "2")):
        out = tmp_path / f"p{processes}"
        args = train_args(tiny_sd_pipeline, prompts, out, "--dedup_threshold", 2.0, "--retain_recombined", 2)
        args[args.index("--train_batch_size") + 1] = batch
        proc = subprocess.run([*accelerate_launch(processes), str(ROOT / "train_memmit.py"), *args],
                              env=launch_env(), cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    split = [json.loads((tmp_path / p / "memmit" / "forget" / "forget.json").read_text()) for p in ("p1", "p2")]
    assert split[0]["prompts"] == split[1]["prompts"] and split[0]["retain_prompts"] == split[1]["retain_prompts"]
    one, two = (load_file(tmp_path / p / "unet" / "diffusion_pytorch_model.safetensors") for p in ("p1", "p2"))
    for name in one:  # summed in another order: test_multiprocess's tolerance
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=5e-5)


@pytest.mark.slow  # three forget runs: ~12 s
def test_a_resumed_forget_run_trains_on_the_renders_it_wrote(tiny_sd_pipeline, tmp_path, monkeypatch):
    """Stopped after its first checkpoint, a forget run resumed trains on the forget set its first start wrote
    (rendering nothing again: renders on a GPU need not repeat bit for bit) to the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from memmit.forget import build
    from memmit.train.trainer import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    # Every render reproduces (threshold 2), so every retain candidate is left out: none rendered.
    flags = ["--dedup_threshold", 2.0, "--num_rounds", 2, "--checkpointing_steps", 1, "--retain_neighbours", 0,
             "--retain_recombined", 0]
    run(parse_args(train_args(tiny_sd_pipeline, prompts, tmp_path / "ref", *flags)))
    reset_accelerator()
    save = Trainer.save_checkpoint

    def stop_after_saving(trainer):
        save(trainer)
        raise KeyboardInterrupt("stopped after the first checkpoint")

    out = tmp_path / "out"
    monkeypatch.setattr(Trainer, "save_checkpoint", stop_after_saving)
    with pytest.raises(KeyboardInterrupt):
        run(parse_args(train_args(tiny_sd_pipeline, prompts, out, *flags)))
    reset_accelerator()
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    monkeypatch.setattr(build, "render", lambda *a, **k: pytest.fail("the resumed run rendered again"))
    trainer = run(parse_args(train_args(tiny_sd_pipeline, prompts, out, *flags, "--resume_from_checkpoint", "latest")))
    assert trainer.resumed_changes == {}
    weights = [load_file(path / "unet" / "diffusion_pytorch_model.safetensors") for path in (tmp_path / "ref", out)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert (out / "memmit" / "forget" / "forget.json").read_text() == \
        (tmp_path / "ref" / "memmit" / "forget" / "forget.json").read_text()


def test_a_written_forget_set_reads_back_only_for_its_settings_and_prompts(tmp_path):
    renders = [np.random.RandomState(k).randint(0, 256, (3, 4, 4, 1), dtype=np.uint8) for k in range(3)]
    forget = ForgetSet(["copied", "novel"], renders[:2], [[0, 2], []], anchors={"copied": "anchor"},
                       triggers={"copied": [{"word": "copied", "score_drop": 1.5, "trigger": True}]},
                       retain_prompts=["anchor"], retain_renders=[renders[2][:2]], dropped=["novel"])
    forget.write(tmp_path, {"forget_samples": 3})
    back = ForgetSet.stored(tmp_path, {"forget_samples": 3}, ["copied", "novel"])
    assert back.report({}) == forget.report({}) and back.summary() == forget.summary()
    assert all(np.array_equal(a, b) for a, b in zip(back.renders + back.retain_renders,
                                                    forget.renders + forget.retain_renders))
    assert len(back.retain_renders) == 1
    assert ForgetSet.stored(tmp_path, {"forget_samples": 4}, ["copied", "novel"]) is None
    assert ForgetSet.stored(tmp_path, {"forget_samples": 3}, ["copied"]) is None
    assert ForgetSet.stored(tmp_path / "none", {"forget_samples": 3}, ["copied", "novel"]) is None


def test_a_lora_forget_run_moves_only_the_adapted_projections(tiny_sd_pipeline, tmp_path):
    """Forget mode with an adapter (the LoRA recipes): the reproductions and retained renders train the adapter
    alone; merged into the export, only the adapted projections differ from the input."""
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "out"
    run(parse_args(train_args(tiny_sd_pipeline, prompts, out, "--dedup_threshold", 2.0, "--retain_neighbours", 0,
                              "--retain_recombined", 0, "--lora_rank", 2, "--lora_target_modules", "to_q", "to_v",
                              "--learning_rate", 1e-2)))
    before, after = (load_file(path / "unet" / "diffusion_pytorch_model.safetensors")
                     for path in (Path(tiny_sd_pipeline), out))
    changed = {k for k in after if (after[k] - before[k]).abs().max() > 1e-5}
    assert changed and {k.rsplit(".", 2)[-2] for k in changed} == {"to_q", "to_v"}, changed


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_sdxl_and_flux_forget_towards_their_trigger_words(family, tiny_sdxl_pipeline, tiny_flux_pipeline, tmp_path):
    """The other families forget mode mitigates: each finds its trigger words with its own score (DDIM for SDXL,
    the flow-matching velocity gap for Flux), trains and exports a pipeline that loads with its own class."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    pipe, pipeline_class, extra = {"sdxl": (tiny_sdxl_pipeline, StableDiffusionXLPipeline, []),
                                   "flux": (tiny_flux_pipeline, FluxPipeline, ["--max_sequence_length", 32])}[family]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]))
    out = tmp_path / "out"
    flags = ["--resolution", 16, "--center_crop", *extra]
    run(parse_args(train_args(pipe, prompts, out, "--dedup_threshold", 2.0, "--retain_neighbours", 0,
                              "--retain_recombined", 0, *flags)))
    report = json.loads((out / "memmit" / "forget" / "forget.json").read_text())
    assert all(r["reproduces"] and len(r["words"]) == len(r["prompt"].split()) for r in report["prompts"])
    assert_trigger_anchors(report, load_task(parse_args(train_args(pipe, prompts, out, "--caption_column", "text",
                                                                   *flags))))
    assert isinstance(pipeline_class.from_pretrained(out), pipeline_class)
