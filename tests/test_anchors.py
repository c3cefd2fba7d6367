"""dedup_captions=anchor: a copied caption unlearned towards the captions of look-alike images (Kumari et al. 2023's
model-based concept ablation): which copies, which anchors, the loss, the draws, and AGC leaving them alone."""

from __future__ import annotations

import csv
import json

import datasets
import pytest
import torch
from diffusers import StableDiffusionPipeline

from memmit.cli import run, train_main
from memmit.config import parse_args
from memmit.data.captions import ANCHORS, anchor_captions, plan_anchors
from memmit.families.inputs import tokenize
from memmit.families.stable_diffusion import min_snr_weights

from conftest import mnist_images, reset_accelerator
from test_text_to_image import generators, make_task, reference_loss, rows, seeded
from test_train import args


def test_anchors_are_the_nearest_captions_of_images_outside_every_cluster():
    # Rows 3 and 4 are copies sharing "dup"; rows 1 and 5 are copies sharing no caption (merged, not anchored).
    values = ["zero", "one", "two", "dup", "dup", "five", "dup", ""]
    vectors = {"zero": [1.0, 0.0], "one": [0.0, 1.0], "two": [1.0, 1.1], "dup": [1.0, 1.0], "five": [0.9, 1.0]}
    seen = []

    def embed(captions):
        seen.append(captions)
        return torch.tensor([vectors[c] for c in captions])

    clusters = [[4, 3], [1, 5]]
    plan = plan_anchors(values, clusters)
    assert (plan.copied, plan.copies, plan.captions, plan.kept) == ({3: "dup"}, {3: 2}, {1: ["one", "five"]}, [1, 3])
    # Candidates: the captions of rows 0, 2 (row 6 repeats the copied caption, row 7 has none), nearest first by
    # cosine; only the kept copy (the smallest id) is anchored.
    assert anchor_captions(values, clusters, plan.copied, embed, 1) == {3: ["two"]}
    assert seen[-1] == ["dup", "zero", "two"]
    assert anchor_captions(values, clusters, plan.copied, embed, 5) == {3: ["two", "zero"]}
    # Copies that share the empty caption are not anchored: their kept copy trains it.
    plan = plan_anchors(["a", "b", "c", "", "", "f", "", ""], clusters)
    assert (plan.copied, plan.captions, plan.kept) == ({}, {1: ["b", "f"]}, [1, 3])
    with pytest.raises(ValueError, match="none has a caption of its own"):
        anchor_captions(["", "one", "", "dup", "dup", "five", "dup", ""], clusters, {3: "dup"}, embed, 2)


def test_every_caption_that_two_copies_carry_is_unlearned_on_a_copy_of_its_own():
    """Web duplicates: one picture re-uploaded under several captions. Each caption >= 2 copies carry gets its own
    anchored row; the captions one copy carries train on one more row, merged; copies that share no caption merge."""
    values = ["photo of a cat", "a cat", "photo of a cat", "a cat", "my pet", "cat!", "x", "y", ["p", "q"], ["p", "q"]]
    plan = plan_anchors(values, [[5, 4, 3, 2, 1, 0], [6, 7], [8, 9]])
    assert plan.copied == {0: "photo of a cat", 1: "a cat", 8: "p", 9: "q"}
    assert plan.copies == {0: 2, 1: 2, 8: 2, 9: 2}
    # Row 4 (a row carrying one of them) trains the two captions one copy carries each; rows 6 and 7 share nothing: 6 trains both, as merge does;
    # a list-valued anchored row trains only the caption it unlearns.
    assert plan.captions == {4: ["my pet", "cat!"], 6: ["x", "y"], 8: ["p"], 9: ["q"]}
    assert plan.kept == [0, 1, 4, 6, 8, 9]
    # Every caption copied: no row keeps training the picture.
    assert plan_anchors(["a", "a", "b", "b"], [[0, 1, 2, 3]]).kept == [0, 2]


def test_an_anchored_row_trains_its_own_caption_and_draws_one_anchor(tiny_sd_pipeline, captioned_digits_dir):
    task = make_task(tiny_sd_pipeline, captioned_digits_dir, "--caption_dropout", 1.0)
    batch = rows(captioned_digits_dir, 4)
    batch[ANCHORS] = [["the number 3", "digit 1"], [], ["digit 5"], []]
    prompts, text = task.inputs.text_inputs(batch, generators(1, 4))
    # Dropout (probability 1) empties every other prompt; an anchored one is the caption being unlearned.
    assert prompts == [batch["text"][0], "", batch["text"][2], ""]
    first = ["the number 3", "digit 1"][int(torch.randint(2, (), generator=seeded(1000)))]
    tokenizer = task.text.tokenizers[0]
    want = tokenizer([first, "", "digit 5", ""], padding="max_length", max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids
    assert torch.equal(text["anchor_ids"], want)
    assert text["anchored"].tolist() == [True, False, True, False]
    batch[ANCHORS] = [[]] * 4
    assert "anchored" not in task.inputs.text_inputs(batch, generators(1, 4))[1]


def test_an_anchored_loss_is_the_distance_to_the_models_own_anchor_prediction(tiny_sd_pipeline,
                                                                            captioned_digits_dir):
    task = make_task(tiny_sd_pipeline, captioned_digits_dir)
    task.denoiser.requires_grad_(False)
    batch = rows(captioned_digits_dir, 6)
    batch[ANCHORS] = [["the number 3"], [], [], ["digit 1", "digit 5"], [], []]
    inputs = task.inputs(batch, generators(1, 6))
    out = task.per_sample_loss(task.denoiser, inputs, generators(2, 6), torch.device("cpu"))
    loss, t, _ = reference_loss(tiny_sd_pipeline, inputs, seed=2)
    assert torch.equal(out.timesteps, t) and out.anchored.tolist() == [True, False, False, True, False, False]
    torch.testing.assert_close(out.losses, loss)
    # The anchored samples' losses are not denoising losses: against the noise they would differ.
    plain = reference_loss(tiny_sd_pipeline, {k: v for k, v in inputs.items() if k != "anchored"}, seed=2)[0]
    assert not torch.allclose(out.losses[out.anchored], plain[out.anchored])
    torch.testing.assert_close(out.losses[~out.anchored], plain[~out.anchored])
    # dedup_anchor_weight (default 16) weighs the anchored samples alone; with min-SNR it multiplies its weights.
    assert out.weights.tolist() == [16.0, 1.0, 1.0, 16.0, 1.0, 1.0]
    task = make_task(tiny_sd_pipeline, captioned_digits_dir, "--dedup_anchor_weight", 2.5, "--snr_gamma", 5.0)
    task.denoiser.requires_grad_(False)
    out = task.per_sample_loss(task.denoiser, inputs, generators(2, 6), torch.device("cpu"))
    snr = min_snr_weights(task.scheduler, out.timesteps, 5.0, task.noise.prediction_type)
    torch.testing.assert_close(out.weights, snr * torch.tensor([2.5, 1, 1, 2.5, 1, 1]))
    assert make_task(tiny_sd_pipeline, captioned_digits_dir, "--dedup_anchor_weight", 1).per_sample_loss(
        task.denoiser, inputs, generators(2, 6), torch.device("cpu")).weights is None
    # dedup_anchor_noisiest: the anchored samples' timesteps move into the noisiest 40 % (20 of the 50); the
    # others' draws stay as they were.
    task = make_task(tiny_sd_pipeline, captioned_digits_dir, "--dedup_anchor_noisiest", 0.4)
    task.denoiser.requires_grad_(False)
    out = task.per_sample_loss(task.denoiser, inputs, generators(2, 6), torch.device("cpu"))
    loss, moved, _ = reference_loss(tiny_sd_pipeline, inputs, seed=2, noisiest=0.4)
    assert torch.equal(out.timesteps, moved) and (moved[out.anchored] >= 30).all()
    assert torch.equal(moved[~out.anchored], t[~out.anchored]) and not torch.equal(moved, t)
    torch.testing.assert_close(out.losses, loss)


def copied_caption_dataset(path, copies=("copy",) * 6) -> str:
    """7 unique digits with their own captions, then digit 0 once per caption of `copies` (six times "copy")."""
    images, labels = mnist_images(8)
    ds = datasets.Dataset.from_dict({"image": images[1:] + [images[0]] * len(copies),
                                     "text": [f"digit {y} number {i}" for i, y in enumerate(labels[1:])]
                                     + list(copies)})
    ds.save_to_disk(str(path))
    return str(path)


def test_a_run_anchors_the_kept_copy_and_agc_never_skips_or_banks_it(tiny_sd_pipeline, tmp_path):
    data = copied_caption_dataset(tmp_path / "data")
    out = tmp_path / "out"
    # lambda 50 with one bank entry: once the bank holds a loss, every ordinary sample is skipped.
    trainer = run(parse_args(args(tiny_sd_pipeline, data, out, "--caption_column", "text", "--dedup_captions",
                                  "anchor", "--dedup_anchors", 2, "--num_shards", 1, "--num_rounds", 1,
                                  "--local_steps", 6, "--agc_lambda", 50, "--agc_bank_bins", 1)))
    assert sorted(trainer.split.shards[0]) == list(range(8)), "keep_one keeps the first copy, 7"
    ds = datasets.load_from_disk(data)
    # The two captions whose text-encoder outputs are nearest to "copy"'s, computed here on a fresh load.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline)
    with torch.no_grad():
        ids = tokenize([pipe.tokenizer], [77], ds["text"][:8])["input_ids"]
        emb = torch.nn.functional.normalize(pipe.text_encoder(ids)[0].flatten(1), dim=1)
    nearest = (emb[:7] @ emb[7]).argsort(descending=True)[:2].tolist()
    report = json.loads((out / "memmit" / "duplicates.json").read_text())
    assert report["anchored_captions"] == [{"caption": "copy", "copies": 6,
                                            "anchors": [ds["text"][i] for i in nearest]}]
    assert trainer.split.anchors == {7: [ds["text"][i] for i in nearest]}
    with open(out / "memmit" / "candidates.csv") as f:
        counts = {int(r["sample_id"]): (int(r["seen"]), int(r["skipped"])) for r in csv.DictReader(f)}
    assert counts[7][0] > 0 and counts[7][1] == 0
    assert sum(counts[i][1] for i in range(7)) > 0
    assert type(StableDiffusionPipeline.from_pretrained(out)) is StableDiffusionPipeline


def test_a_run_anchors_each_caption_a_picture_was_copied_under(tiny_sd_pipeline, tmp_path):
    data = copied_caption_dataset(tmp_path / "data", ("copy", "a copy", "copy", "a copy", "copy", "once"))
    out = tmp_path / "out"
    trainer = run(parse_args(args(tiny_sd_pipeline, data, out, "--caption_column", "text", "--num_shards", 1,
                                  "--num_rounds", 1, "--local_steps", 1, "--dedup_anchors", 1)))
    # The text-to-image default anchors (dedup keep_one): rows 7 and 8 unlearn "copy" and "a copy", row 12 trains
    # "once", the caption it carries; the other copies are left out.
    assert sorted(trainer.split.shards[0]) == [*range(9), 12] and trainer.split.captions == {}
    assert sorted(trainer.split.anchors) == [7, 8]
    report = json.loads((out / "memmit" / "duplicates.json").read_text())
    assert [(a["caption"], a["copies"]) for a in report["anchored_captions"]] == [("copy", 3), ("a copy", 2)]
    assert [a["anchors"] for a in report["anchored_captions"]] == [trainer.split.anchors[7], trainer.split.anchors[8]]


def test_bad_anchor_options_are_named(tiny_sd_pipeline, captioned_digits_dir, tmp_path, capsys):
    assert train_main(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path, "--caption_column", "text",
                           "--dedup_captions", "anchor", "--dedup_anchors", 0)) == 2
    assert "dedup_anchors must be >= 1, got 0" in capsys.readouterr().err
    assert train_main(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path, "--caption_column", "text",
                           "--dedup_captions", "anchor", "--dedup_anchor_weight", 0)) == 2
    assert "dedup_anchor_weight must be > 0, got 0" in capsys.readouterr().err
    assert train_main(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path, "--caption_column", "text",
                           "--dedup_captions", "anchor", "--dedup_anchor_noisiest", 0)) == 2
    assert "dedup_anchor_noisiest must be in (0, 1], got 0" in capsys.readouterr().err
    assert train_main(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path, "--caption_column", "text",
                           "--dedup_captions", "anchor", "--dedup", "same_shard")) == 2
    assert "dedup_captions=anchor acts on the captions of the copies" in capsys.readouterr().err


@pytest.mark.slow  # ~20 s of launched processes; test_multiprocess's one-shard group test runs in make test
def test_anchored_copies_train_alike_on_two_processes_and_on_one(tiny_sd_pipeline, tmp_path):
    """The anchored flag and weight travel with each sample's loss through the group's gather: K = 1 on two
    processes, each taking half of every micro-batch, is one process with the whole micro-batch."""
    from test_multiprocess import finish, launch, weights

    data = copied_caption_dataset(tmp_path / "data")
    extra = ["--caption_column", "text", "--dedup_captions", "anchor", "--num_shards", "1", "--local_epochs", "3"]
    finish(launch(1, tiny_sd_pipeline, data, tmp_path / "one", *extra, "--train_batch_size", "4"))
    finish(launch(2, tiny_sd_pipeline, data, tmp_path / "two", *extra, "--train_batch_size", "2"))
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in one:  # summed in another order: test_multiprocess's tolerance
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=5e-5)
    candidates = (tmp_path / "one" / "memmit" / "candidates.csv").read_text()
    assert candidates == (tmp_path / "two" / "memmit" / "candidates.csv").read_text()
    with open(tmp_path / "one" / "memmit" / "candidates.csv") as f:
        rows = {int(r["sample_id"]): r for r in csv.DictReader(f)}
    assert int(rows[7]["seen"]) > 0 and int(rows[7]["skipped"]) == 0


def test_text_to_image_anchors_copied_captions_by_default(tiny_sd_pipeline, tiny_pipeline, digits_dir, tmp_path):
    """With no caption option, a text-to-image run with dedup keep_one trains what EFFICACY.md measured as the
    default: the run with --dedup_captions anchor, bit for bit. Without keep_one, and for an unconditional
    pipeline, nothing is anchored; the saved config says what ran."""
    import yaml

    from test_text_to_image import weights

    data = copied_caption_dataset(tmp_path / "data")
    common = ["--caption_column", "text", "--num_shards", 1, "--num_rounds", 1, "--local_steps", 2]
    run(parse_args(args(tiny_sd_pipeline, data, tmp_path / "default", *common)))
    reset_accelerator()
    run(parse_args(args(tiny_sd_pipeline, data, tmp_path / "anchor", *common, "--dedup_captions", "anchor")))
    default, anchor = weights(tmp_path / "default", "unet"), weights(tmp_path / "anchor", "unet")
    assert all(torch.equal(default[k], anchor[k]) for k in anchor)

    def saved(out) -> str:
        return yaml.safe_load((out / "memmit" / "config.yaml").read_text())["dedup_captions"]

    assert saved(tmp_path / "default") == "anchor"
    reset_accelerator()
    run(parse_args(args(tiny_sd_pipeline, data, tmp_path / "none", *common, "--dedup", "none")))
    reset_accelerator()
    run(parse_args(args(tiny_pipeline, digits_dir, tmp_path / "ddpm", "--num_shards", 1, "--num_rounds", 1,
                        "--local_steps", 1)))
    assert saved(tmp_path / "none") == saved(tmp_path / "ddpm") == "ignore"


def test_anchor_options_without_anchoring_are_refused(tiny_sd_pipeline, captioned_digits_dir, tmp_path, capsys):
    for flags in (["--dedup_captions", "merge", "--dedup_anchor_weight", 4],
                  ["--dedup", "none", "--dedup_anchors", 2]):
        assert train_main(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path / "out", "--caption_column", "text",
                               *flags)) == 2
        assert ": options of anchored captions, and this run anchors none" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
