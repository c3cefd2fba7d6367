"""`memmit eval --detect_prompts` (Wen et al. 2024) on a tiny real Stable Diffusion pipeline."""

from __future__ import annotations

import json
from itertools import product

import datasets
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from memmit.cli import main
from memmit.config import EvalConfig
from memmit.eval.detect import prompt_scores
from memmit.eval.sampling import load_eval_task, sample_generators

from conftest import mnist_images

PROMPTS = ["a handwritten digit 3", "", "the number 7", "digit 1 written by hand", "a handwritten digit 3"]


def task_for(pipe: str, tmp_path):
    return load_eval_task(EvalConfig(pretrained_model_name_or_path=pipe, output_dir=str(tmp_path), detect_prompts=True,
                                     prompts_file="unused"))


def test_one_step_score_is_the_written_out_guidance_gap(tiny_sd_pipeline, tmp_path):
    scores = prompt_scores(task_for(tiny_sd_pipeline, tmp_path), PROMPTS, num_inference_steps=10, detect_steps=1,
                           num_seeds=1, seed=3, batch_size=2, device=torch.device("cpu"), show_progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]

    def encode(prompt: str) -> torch.Tensor:
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            (generator,) = sample_generators(3, range(i, i + 1))
            x = torch.randn((1, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
            gap = pipe.unet(x, t, encoder_hidden_states=encode(prompt)).sample - \
                pipe.unet(x, t, encoder_hidden_states=encode("")).sample
            assert float(scores[i]) == pytest.approx(float(gap.norm()), rel=1e-4), prompt
    # The empty prompt is the unconditional prediction itself (up to float rounding between batch rows).
    assert float(scores[1]) < 1e-5 < float(scores[[0, 2, 3, 4]].min())


def test_scores_do_not_depend_on_the_batch_size_or_the_other_prompts(tiny_sd_pipeline, tmp_path):
    task = task_for(tiny_sd_pipeline, tmp_path)

    def scores(prompts, batch_size):
        return prompt_scores(task, prompts, 10, 3, 2, 0, batch_size, torch.device("cpu"), False)

    together = scores(PROMPTS, 3)
    torch.testing.assert_close(scores(PROMPTS, 10), together)
    # Seeds are per (prompt position, noise): the same prompt at another position draws other noises.
    assert together[0] != together[4]
    assert float(together[1]) < 1e-5 < float(together[[0, 2, 3, 4]].min())


def captioned_with_duplicates(path) -> str:
    images, labels = mnist_images(10)
    captions = [f"digit {y} number {i}" for i, y in enumerate(labels)]
    ds = datasets.Dataset.from_dict({"image": images + images[:2] * 3, "text": captions + captions[:2] * 3})
    ds.save_to_disk(str(path))
    return str(path)


def test_training_captions_are_ranked_with_the_auc_against_duplicated_ones(tiny_sd_pipeline, tmp_path, capsys):
    data = captioned_with_duplicates(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["eval", "--detect_prompts", "--pretrained_model_name_or_path", tiny_sd_pipeline, "--dataset_name",
                 data, "--caption_column", "text", "--num_inference_steps", "4", "--detect_steps", "2",
                 "--detect_seeds", "2", "--output_dir", str(out)]) == 0
    report = json.loads((out / "detect_prompts.json").read_text())
    rows = report["prompts"]
    assert len(rows) == 10 and [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    duplicated = {r["prompt"] for r in rows if r["duplicated"]}
    assert duplicated == set(datasets.load_from_disk(data)["text"][:2])
    # AUC = the share of (duplicated, unique) pairs the score orders correctly.
    pairs = list(product([r["score"] for r in rows if r["duplicated"]], [r["score"] for r in rows if not r["duplicated"]]))
    assert report["roc_auc_duplicated"] == pytest.approx(sum(d > u for d, u in pairs) / len(pairs))
    printed = capsys.readouterr().out
    assert "ROC AUC against the captions duplicated" in printed and rows[0]["prompt"] in printed


def test_a_prompts_file_needs_no_dataset(tiny_sd_pipeline, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 3\n\nthe number 7\n")
    out = tmp_path / "out"
    assert main(["eval", "--detect_prompts", "--prompts_file", str(prompts), "--pretrained_model_name_or_path",
                 tiny_sd_pipeline, "--num_inference_steps", "3", "--detect_steps", "1", "--output_dir", str(out)]) == 0
    report = json.loads((out / "detect_prompts.json").read_text())
    assert {r["prompt"] for r in report["prompts"]} == {"a handwritten digit 3", "the number 7"}
    assert "roc_auc_duplicated" not in report and "duplicated" not in report["prompts"][0]


@pytest.mark.parametrize("pipe, extra, message", [
    ("sd", ["--prompts_file", "missing.txt"], "prompts_file 'missing.txt' cannot be read"),
    ("ddpm", ["--prompts_file", "PROMPTS"], "detect_prompts, prompts_file: text-to-image options, and DDPMPipeline is unconditional"),
    ("sd", ["--dataset_name", "DATA"], "pass one of prompts_file or caption_column"),
    ("sd", ["--prompts_file", "PROMPTS", "--detect_steps", "60"], "detect_steps must be between 1 and"),
])
def test_bad_detection_input_is_named(tiny_sd_pipeline, tiny_pipeline, captioned_digits_dir, tmp_path, capsys,
                                      pipe, extra, message):
    (tmp_path / "prompts.txt").write_text("a prompt\n")
    extra = [{"PROMPTS": str(tmp_path / "prompts.txt"), "DATA": captioned_digits_dir}.get(a, a) for a in extra]
    assert main(["eval", "--detect_prompts", "--pretrained_model_name_or_path",
                 tiny_sd_pipeline if pipe == "sd" else tiny_pipeline, "--output_dir", str(tmp_path / "out"),
                 *extra]) == 2
    assert message in capsys.readouterr().err
