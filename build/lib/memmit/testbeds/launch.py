"""Runs of train_memmit.py in their own process, as a user would start them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/ and train_memmit.py


def launch(args: list[str], accelerate: bool = True) -> None:
    """Run train_memmit.py in its own process, as a user would."""
    prefix = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] if accelerate else [sys.executable]
    cmd = prefix + [str(ROOT / "train_memmit.py"), *map(str, args)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
