"""Checkpoints are complete or absent, rotate, and resolve 'latest'."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from memmit.train import checkpoint as ckpt


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_save_load_rotate_and_latest(tmp_path, accelerator):
    for step in (2, 4, 6):
        ckpt.save(accelerator, tmp_path, step, {"step": step}, {"x": torch.tensor([step])}, total_limit=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    latest = ckpt.resolve(tmp_path, "latest")
    shared, state = ckpt.load(accelerator, latest)
    assert shared["step"] == 6 and state["x"].item() == 6 and shared["num_processes"] == 1
    assert ckpt.resolve(tmp_path, "checkpoint-4") == tmp_path / "checkpoint-4"
    assert ckpt.resolve(tmp_path / "none", "latest") is None
    with pytest.raises(ValueError, match="not a complete memmit checkpoint"):
        ckpt.resolve(tmp_path, "checkpoint-2")


def test_crash_mid_write_leaves_no_complete_looking_checkpoint(tmp_path, accelerator, monkeypatch):
    ckpt.save(accelerator, tmp_path, 1, {"step": 1}, {})
    real_save = torch.save

    def crash_on_shared(obj, path, *a, **k):
        if str(path).endswith("shared.pt"):
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_shared)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(accelerator, tmp_path, 2, {"step": 2}, {})
    assert not (tmp_path / "checkpoint-2").exists()
    assert ckpt.resolve(tmp_path, "latest") == tmp_path / "checkpoint-1"


def test_resume_with_other_process_count_is_refused(tmp_path, accelerator):
    path = ckpt.save(accelerator, tmp_path, 1, {"step": 1}, {})
    shared = torch.load(path / "shared.pt")
    shared["num_processes"] = 2
    torch.save(shared, path / "shared.pt")
    with pytest.raises(ValueError, match="written by 2 processes"):
        ckpt.load(accelerator, path)
