"""Training inputs made ahead of the loop, in `torch.utils.data` workers (--dataloader_num_workers).

A shard turn's micro-batches are known before it starts (the stream is deterministic), so the loader gets them
as a list and decodes, transforms and tokenizes them in workers while the model trains; each sample's draws come
from its own keyed generator, so the inputs are the same with 0 or N workers.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import datasets
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.dataset import source_names
from ..draws import DATA
from .shards import MicroBatch
from ..data.split import Split


PREFETCH = 2  # micro-batches each worker makes ahead (torch's default prefetch_factor)


class TurnInputs(Dataset):
    """Item i: the model inputs of micro-batch i (a dict of stacked tensors), or None for an empty share.
    `make_inputs(rows, generators, ids)` reads the dataset columns it names in `make_inputs.columns`."""

    def __init__(self, dataset: datasets.Dataset, split: Split, caption_column: Optional[str],
                 make_inputs: Callable[[dict, list, Sequence[int]], dict], batches: Sequence[MicroBatch], seed: int,
                 image_column: str):
        # Only the columns the inputs read: cached latents (families/latents.py) need no image decoded.
        self.dataset, self.rows_of = dataset, dataset.select_columns(list(make_inputs.columns))
        self.split, self.caption_column = split, caption_column
        self.make_inputs, self.batches, self.seed, self.image_column = make_inputs, batches, seed, image_column

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Optional[dict]:
        batch = self.batches[i]
        if not batch.ids:
            return None
        try:
            return self._inputs(batch)
        except Exception as exc:  # PIL and datasets raise many types for a bad file: find and name the sample
            raise ValueError(f"cannot make the training inputs of {self._culprit(batch)}: {exc}") from exc

    def _inputs(self, batch: MicroBatch) -> dict:
        rows = self.split.rows(self.rows_of, list(batch.ids), self.caption_column)
        return self.make_inputs(rows, batch.generators(self.seed, DATA), batch.ids)

    def _culprit(self, batch: MicroBatch) -> str:
        for j, sample in enumerate(batch.ids):
            try:
                self._inputs(MicroBatch(batch.shard, batch.epoch, (sample,), (batch.positions[j],)))
            except Exception:
                name = source_names(self.dataset.select([sample]), self.image_column)[0]
                return f"sample {sample}" + (f" ({name})" if not name.startswith("index ") else "")
        return f"samples {list(batch.ids)}"


def turn_inputs(inputs: TurnInputs, num_workers: int, pin_memory: bool) -> Iterator[Optional[dict]]:
    """The turn's inputs in order; a worker that dies (killed: out of memory, a signal) is reported with the
    samples that were being made then: the micro-batch the loop waited for and those prefetched after it."""
    items = iter(turn_loader(inputs, num_workers, pin_memory))
    for i, batch in enumerate(inputs.batches):
        try:
            yield next(items)
        except RuntimeError as exc:  # a worker's own exception arrives with its type (ValueError above)
            if not num_workers:
                raise
            in_flight = [s for b in inputs.batches[i:i + num_workers * PREFETCH] for s in b.ids]
            raise RuntimeError(f"a data-loading worker died while making samples {in_flight} (shard {batch.shard}, "
                               f"epoch {batch.epoch}); --dataloader_num_workers 0 makes them in the main process, "
                               f"where a failing sample raises its own error: {exc}") from exc


def turn_loader(inputs: TurnInputs, num_workers: int, pin_memory: bool) -> DataLoader:
    """Items in order (the stream already ordered them), made `num_workers` at a time ahead of the loop."""
    # A generator of its own: a DataLoader otherwise draws its workers' base seed from torch's global generator,
    # whose state (dropout's) a checkpoint saves, so a resumed turn would draw it twice.
    return DataLoader(inputs, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator(), prefetch_factor=PREFETCH if num_workers else None)
