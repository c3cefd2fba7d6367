"""Training inputs made in data-loading workers: the same weights with 0 or 2 workers, and a bad sample named."""

from __future__ import annotations

import io
import os
import signal

import datasets
import pytest
import torch

from memmit.cli import run
from memmit.config import parse_args
from memmit.train.loader import TurnInputs, turn_inputs, turn_loader
from memmit.train.shards import MicroBatch
from memmit.data.split import Split
from memmit.train.setup import build_trainer

from conftest import mnist_images
from test_text_to_image import make_task, weights
from test_train import args


def test_two_workers_give_the_weights_the_main_process_gives(tiny_sd_pipeline, captioned_digits_dir, tmp_path):
    """Every data-side draw is on: crop offsets, flips, the pick among a row's captions, dropout and caption
    replacement; two epochs per turn, the second one's batches keyed by epoch 1."""
    common = ["--caption_column", "captions", "--num_shards", 2, "--num_rounds", 2, "--local_epochs", 2,
              "--train_batch_size", 5, "--resolution", 16, "--random_flip", "--caption_dropout", 0.3,
              "--caption_replace_prob", 0.5, "--agc_lambda", 0.9]
    for workers in (0, 2):
        run(parse_args(args(tiny_sd_pipeline, captioned_digits_dir, tmp_path / str(workers), *common,
                            "--dataloader_num_workers", workers)))
    main, workers = weights(tmp_path / "0", "unet"), weights(tmp_path / "2", "unet")
    assert all(torch.equal(main[k], workers[k]) for k in main)
    assert (tmp_path / "0" / "memmit" / "candidates.csv").read_text() == \
        (tmp_path / "2" / "memmit" / "candidates.csv").read_text()


class RecordsProcess:
    """Inputs that write down the process that made each micro-batch."""

    def __init__(self, inputs, log):
        self.inputs, self.log, self.columns = inputs, log, inputs.columns

    def __call__(self, rows, generators, ids):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self.inputs(rows, generators, ids)


@pytest.mark.parametrize("workers", [0, 2])
def test_inputs_are_made_in_as_many_worker_processes_as_asked_for(tiny_pipeline, digits_dir, tmp_path, workers):
    trainer = build_trainer(parse_args(args(tiny_pipeline, digits_dir, tmp_path / "out", "--num_shards", 1,
                                            "--num_rounds", 1, "--local_steps", 4, "--train_batch_size", 2,
                                            "--dataloader_num_workers", workers)))
    log = tmp_path / "pids"
    trainer.task.inputs = RecordsProcess(trainer.task.inputs, log)
    trainer.train()
    pids = log.read_text().split()
    assert len(pids) == 4  # one per micro-batch
    if workers:  # handed out in turn to the workers, none made in the main process
        assert len(set(pids)) == 2 and str(os.getpid()) not in pids
    else:
        assert set(pids) == {str(os.getpid())}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_sample_that_cannot_be_made_into_inputs_is_named(tiny_sd_pipeline, captioned_digits_dir, num_workers):
    """A file that went bad after the checks before training (they decode every image once)."""
    images, _ = mnist_images(4)
    encoded = []
    for img in images:
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    encoded[3] = {"bytes": b"not an image any more", "path": None}
    ds = datasets.Dataset.from_dict({"image": encoded, "text": ["a one", "a two", "a three", "a four"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    task = make_task(tiny_sd_pipeline, captioned_digits_dir)
    batches = [MicroBatch(0, 0, (0, 1), (0, 1)), MicroBatch(0, 0, (2, 3), (2, 3))]
    inputs = TurnInputs(ds, Split([[0, 1, 2, 3]]), "text", task.inputs, batches, seed=0, image_column="image")
    loader = iter(turn_loader(inputs, num_workers, pin_memory=False))
    assert next(loader)["pixels"].shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"cannot make the training inputs of sample 3: "):
        next(loader)


class DiesAt:
    """Inputs whose decoder kills its own process at one sample, as the out-of-memory killer would."""

    def __init__(self, inputs, sample: int):
        self.inputs, self.sample, self.columns = inputs, sample, inputs.columns

    def __call__(self, rows, generators, ids):
        if self.sample in ids:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inputs(rows, generators, ids)


def test_a_worker_that_dies_is_reported_with_the_samples_the_loop_waited_for(tiny_sd_pipeline, captioned_digits_dir):
    task = make_task(tiny_sd_pipeline, captioned_digits_dir)
    ds = datasets.load_from_disk(captioned_digits_dir)
    batches = [MicroBatch(0, 0, (0, 1), (0, 1)), MicroBatch(0, 0, (2, 3), (2, 3))]
    inputs = TurnInputs(ds, Split([list(range(24))]), "text", DiesAt(task.inputs, 3), batches, seed=0,
                        image_column="image")
    # The worker makes both micro-batches ahead: its death may be noticed while the loop waits for either.
    with pytest.raises(RuntimeError, match=r"a data-loading worker died while making samples \[(0, 1, )?2, 3\] "
                                           r"\(shard 0, epoch 0\)"):
        list(turn_inputs(inputs, num_workers=1, pin_memory=False))
