"""`--evaluate`: memmit eval before and after training, its cache, the card and upload, and resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import PartialState
from huggingface_hub import ModelCard

from memmit.eval.audit import evaluate_before
from memmit.cli import main, train_main
from memmit.config import parse_args
from memmit.eval.report import prepare_evaluation

from test_evaluate import encoder_file  # noqa: F401 (a fixture: the TorchScript extractor)
from test_hub import REPO, TOKEN, hub  # noqa: F401 (a fixture: the fake Hub)
from conftest import reset_accelerator
from test_multiprocess import ROOT, accelerate_launch, finish, launch, launch_env
from test_train import args, run_script, unet_weights

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

EVAL = ["--evaluate", "--eval_num_samples", 6, "--eval_num_inference_steps", 2, "--eval_batch_size", 4, "--seed", 3]
TRAIN = ["--num_rounds", 1, "--local_steps", 2]


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path) -> Path:
    """Each test's own eval cache, never the user's ~/.cache (subprocesses inherit the variable)."""
    monkeypatch.setenv("MEMMIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def flags(pipe, data, out, *extra) -> list[str]:
    return [str(a) for a in args(pipe, data, out, *TRAIN, *EVAL, *extra)]


def eval_report(pipe, data, out, *extra) -> dict:
    """A separate `memmit eval` with the settings --evaluate derives from the training flags."""
    assert main(["eval", "--pretrained_model_name_or_path", str(pipe), "--dataset_name", data, "--output_dir",
                 str(out), "--num_samples", "6", "--num_inference_steps", "2", "--batch_size", "4", "--seed", "3",
                 *map(str, extra)]) == 0
    return json.loads((Path(out) / "report.json").read_text())


def test_before_and_after_equal_separate_evals_and_the_card_holds_both(tiny_pipeline, digits_dir, tmp_path, capsys,
                                                                       encoder_file):  # noqa: F811
    out = tmp_path / "run"
    assert train_main(flags(tiny_pipeline, digits_dir, out, "--eval_quality_extractor", encoder_file)) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    reset_accelerator()
    assert train_main(flags(tiny_pipeline, digits_dir, tmp_path / "plain", "--no-evaluate")) == 0
    plain = unet_weights(tmp_path / "plain")
    assert all(torch.equal(w, plain[k]) for k, w in unet_weights(out).items())  # evaluating changes no weight
    evals = out / "memmit" / "eval"
    reports = {label: json.loads((evals / label / "report.json").read_text()) for label in ("before", "after")}
    assert (evals / "compare.png").is_file() and (evals / "after" / "samples.npy").is_file()
    # The run's last lines: the comparison table, before then after.
    assert printed[-3].split()[:2] == ["report", "memorized"]
    assert [line.split()[0] for line in printed[-2:]] == ["before", "after"]

    separate = {"before": eval_report(tiny_pipeline, digits_dir, tmp_path / "before",
                                      "--quality_extractor", encoder_file),
                "after": eval_report(out, digits_dir, tmp_path / "after", "--quality_extractor", encoder_file)}
    for label in reports:
        assert reports[label]["pixel"] == separate[label]["pixel"]
        assert reports[label]["quality"] == separate[label]["quality"]
    assert reports["before"]["pixel"]["per_sample"] != reports["after"]["pixel"]["per_sample"]  # training moved it

    card = ModelCard.load(out / "README.md")
    results = card.data.to_dict()["model-index"][0]["results"]
    metrics = {m["name"]: m["value"] for r in results for m in r["metrics"]}
    for label, report in reports.items():
        assert metrics[f"memorized fraction (d1/d2 < 0.333, d2 outside the near-duplicate family (pixels < 0.3)), "
                       f"{label}"] == report["pixel"]["fraction_memorized_ratio"]
        assert metrics[f"Frechet distance (torchscript), {label}"] == report["quality"]["frechet_distance"]
    assert "Each pipeline drew 6 samples, 2 DDIM steps, seed 3, compared with the 24 training images" in card.text
    assert "](memmit/eval/compare.png)" in card.text


def test_text_to_image_before_and_after_render_the_same_training_captions(tiny_sd_pipeline, captioned_digits_dir,
                                                                          tmp_path):
    out = tmp_path / "run"
    assert train_main(flags(tiny_sd_pipeline, captioned_digits_dir, out, "--caption_column", "captions")) == 0
    evals = out / "memmit" / "eval"
    prompts = {label: json.loads((evals / label / "prompts.json").read_text()) for label in ("before", "after")}
    separate = eval_report(tiny_sd_pipeline, captioned_digits_dir, tmp_path / "before", "--caption_column", "captions")
    assert prompts["before"] == prompts["after"] == json.loads((tmp_path / "before" / "prompts.json").read_text())
    assert len(set(prompts["before"])) > 1  # drawn from the list-of-captions column with the run's seed
    assert json.loads((evals / "before" / "report.json").read_text())["pixel"] == separate["pixel"]


def test_bad_eval_options_fail_before_training(tiny_pipeline, digits_dir, tmp_path, capsys):
    cases = [(["--eval_num_samples", 1], "eval_num_samples must be >= 2"),
             (["--eval_threshold", 2], "eval_threshold must be in (0, 1]"),
             (["--eval_feature_extractor", tmp_path / "missing.pt"], "missing.pt"),
             (["--export", "lora"], "--evaluate needs --export full")]
    for extra, message in cases:
        out = tmp_path / "out"
        assert train_main(flags(tiny_pipeline, digits_dir, out, *extra)) == 2
        assert message in capsys.readouterr().err
        assert not (out / "checkpoints").exists()


def test_cache_reuses_the_input_pipelines_report_for_the_same_settings_only(tiny_pipeline, digits_dir, tmp_path,
                                                                            cache, caplog):
    def before(name: str, *extra) -> Path:
        config = parse_args(flags(tiny_pipeline, digits_dir, tmp_path / name, *extra)).eval_config(tmp_path, before=True)
        return evaluate_before(prepare_evaluation(config, False), config, PartialState(), False)

    first = before("a")
    assert first.parent == cache / "eval"
    written = (first / "report.json").stat().st_mtime_ns
    # Another output_dir, the same checkpoint and settings: the same cache entry, reused as it is.
    with caplog.at_level("INFO", logger="memmit.eval.audit"):
        assert before("b") == first
    assert "reusing the before evaluation" in caplog.text
    assert (first / "report.json").stat().st_mtime_ns == written
    assert before("c", "--eval_num_samples", 4) != first
    assert before("d", "--seed", 4) != first
    assert before("e", "--eval_threshold", 0.25) != first


def _kill_when(proc, condition, what: str) -> None:
    deadline = time.time() + 120
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[0].decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow  # ~30 s: runs killed and resumed in their own processes
def test_killed_runs_do_not_repeat_a_finished_evaluation(tiny_pipeline, digits_dir, tmp_path, cache):
    out = tmp_path / "run"
    # Enough steps and samples that the kills land during training and during the after evaluation.
    argv = flags(tiny_pipeline, digits_dir, out, "--local_steps", 30, "--checkpointing_steps", 1,
                 "--eval_num_samples", 32, "--eval_num_inference_steps", 10)

    proc = run_script(argv)
    _kill_when(proc, lambda: any((out / "checkpoints").glob("checkpoint-*")), "training started")
    assert not (out / "model_index.json").exists(), "the run was not killed during training"
    before = next((cache / "eval").glob("*/report.json"))
    written = before.stat().st_mtime_ns

    resume = [*argv, "--resume_from_checkpoint", "latest"]
    proc = run_script(resume)
    _kill_when(proc, lambda: (out / "model_index.json").exists(), "the export")
    assert not (out / "memmit" / "eval" / "after" / "report.json").exists(), "the after evaluation had finished"

    proc = run_script(resume)
    log = proc.communicate()[0].decode()
    assert proc.returncode == 0, log
    assert "reusing the before evaluation" in log and "after evaluation written" in log
    assert before.stat().st_mtime_ns == written
    assert json.loads((out / "memmit" / "eval" / "before" / "report.json").read_text()) == json.loads(before.read_text())

    # A rerun after everything finished (e.g. a failed push) reuses both.
    log = run_script(resume).communicate()[0].decode()
    assert "reusing the before evaluation" in log and "reusing the after evaluation" in log


def test_push_uploads_the_card_and_figure_but_no_samples(hub, tiny_pipeline, digits_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert train_main(flags(tiny_pipeline, digits_dir, out, "--push_to_hub", "--hub_model_id", REPO,
                            "--hub_token", TOKEN)) == 0
    uploaded = hub.files[REPO]
    assert {"README.md", "memmit/eval/compare.png", "memmit/eval/before/report.json",
            "memmit/eval/after/report.json"} <= set(uploaded)
    assert uploaded["memmit/eval/compare.png"] == (out / "memmit" / "eval" / "compare.png").read_bytes()
    assert (out / "memmit" / "eval" / "after" / "samples.npy").is_file()
    assert not any(p.endswith(("samples.npy", "most_copied.png")) or p.startswith("checkpoints/") for p in uploaded)
    card = ModelCard(uploaded["README.md"].decode())
    names = {m["name"] for r in card.data.to_dict()["model-index"][0]["results"] for m in r["metrics"]}
    assert {n.rsplit(", ", 1)[-1] for n in names} == {"before", "after"}
    assert "](memmit/eval/compare.png)" in card.text


def assert_close_nested(a, b) -> None:
    """Equal structures; floats equal to a relative 1e-5, everything else exactly."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_close_nested(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close_nested(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    else:
        assert a == b


@pytest.mark.slow  # ~15 s of launched processes; the CLI under accelerate launch runs in make test
def test_two_processes_split_the_evaluation_and_equal_one(tiny_pipeline, digits_dir, tmp_path):
    out = tmp_path / "two"
    log = finish(launch(2, tiny_pipeline, digits_dir, out, "--num_rounds", "1", "--local_epochs", "1",
                        *map(str, EVAL)))
    assert log.count("before evaluation written") == 1 and log.count("after evaluation written") == 1
    # 6 samples in batches of 4: each process renders one batch, of the two before and the two after.
    assert log.count("process 1 of 2 samples 1 of the 2 batches") == 2
    evals = out / "memmit" / "eval"
    for label, pipe in (("before", tiny_pipeline), ("after", out)):
        single = eval_report(pipe, digits_dir, tmp_path / f"single-{label}")
        assert np.array_equal(np.load(evals / label / "samples.npy"), np.load(tmp_path / f"single-{label}" / "samples.npy"))
        # Another process, maybe with another thread count: distances equal up to float rounding.
        assert_close_nested(json.loads((evals / label / "report.json").read_text())["pixel"], single["pixel"])
    assert "memorized fraction" in (out / "README.md").read_text()


def test_memmit_eval_under_accelerate_launch_equals_one_process(tiny_sd_pipeline, captioned_digits_dir, tmp_path,
                                                                encoder_file):  # noqa: F811
    """Text-to-image: the second process renders the main one's prompts for its share of the samples; both
    processes embed the training set for the quality extractor (the feature store)."""
    flags = ["--pretrained_model_name_or_path", tiny_sd_pipeline, "--dataset_name", captioned_digits_dir,
             "--caption_column", "captions", "--num_samples", "5", "--num_inference_steps", "2", "--batch_size", "2",
             "--seed", "4", "--quality_extractor", encoder_file]
    proc = subprocess.run([*accelerate_launch(2), "--module", "memmit.cli", "eval", *flags, "--output_dir",
                           str(tmp_path / "two")], env=launch_env(), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "process 1 of 2 samples 1 of the 3 batches" in proc.stderr
    assert proc.stdout.count("report written to") == 1  # only the main process writes and prints
    assert main(["eval", *flags, "--output_dir", str(tmp_path / "one")]) == 0
    for name in ("samples.npy", "prompts.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    quality = [json.loads((tmp_path / run / "report.json").read_text())["quality"] for run in ("two", "one")]
    assert quality[0]["frechet_distance"] == pytest.approx(quality[1]["frechet_distance"], rel=1e-5)
