"""The processes that share one piece of work done once before training (detector features, the latent cache): which
part this process does, a barrier, and the main process's result handed to every process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional


def _alone() -> None:
    """The barrier of a single process."""


@dataclass(frozen=True)
class Workers:
    """This process's `index` among the `count` that do the work (None: it only waits), a `barrier` every process
    passes, and `share`, which hands the main process's value to every process. Work item i is done by the worker
    of index i mod count."""

    index: Optional[int] = 0
    count: int = 1
    barrier: Callable[[], None] = _alone
    share: Callable[[Any], Any] = lambda value: value

    def mine(self, items: list[int]) -> list[int]:
        return [i for i in items if self.index is not None and i % self.count == self.index]

    @classmethod
    def of(cls, accelerator, every_machine: bool) -> "Workers":
        """The processes of each machine (`every_machine`: each writes its own machine's cache folder), or those of
        the main machine alone (ranks 0 .. its process count - 1: the folder they write is the one the main process
        reads, where another machine's may be another disk)."""
        from accelerate.utils import broadcast_object_list

        local = min(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), accelerator.num_processes)
        if every_machine:
            index = accelerator.local_process_index
        else:
            index = accelerator.process_index if accelerator.process_index < local else None
        return cls(index, local, accelerator.wait_for_everyone,
                   lambda value: broadcast_object_list([value], from_process=0)[0])
