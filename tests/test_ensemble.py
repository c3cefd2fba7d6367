"""IET aggregation against hand computations."""

import pytest
import torch

from memmit.train.ensemble import FlatAverage, floating_tensors, shard_weights


class WithBuffers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_shard_weights():
    assert shard_weights([1, 3], "size") == [0.25, 0.75]
    assert shard_weights([1, 3], "uniform") == [0.5, 0.5]
    with pytest.raises(ValueError):
        shard_weights([1], "median")


def test_size_weighted_average_of_params_and_float_buffers():
    model = WithBuffers()
    live = floating_tensors(model)
    assert len(live) == 3  # weight, bias, running; the integer buffer is not averaged
    avg = FlatAverage(live)
    with torch.no_grad():
        model.count.fill_(9)
    # Three shards of sizes 2, 1, 1: weights n_k / N = 0.5, 0.25, 0.25.
    for value, wk in zip([1.0, 2.0, 4.0], shard_weights([2, 1, 1], "size")):
        with torch.no_grad():
            model.lin.weight.fill_(value)
            model.lin.bias.fill_(-value)
            model.running.fill_(10 * value)
        avg.add(live, wk)
    avg.finish_round()
    expected = 0.5 * 1.0 + 0.25 * 2.0 + 0.25 * 4.0
    avg.load_into(live)
    assert torch.allclose(model.lin.weight, torch.full((1, 2), expected))
    assert torch.allclose(model.lin.bias, torch.tensor([-expected]))
    assert torch.allclose(model.running, torch.full((2,), 10 * expected))
    assert model.count.item() == 9  # integer buffers keep the live value
    assert torch.count_nonzero(avg.accumulator) == 0


def test_round_starts_from_average_and_the_cross_process_sum_is_applied_chunk_by_chunk(monkeypatch):
    import memmit.train.ensemble

    model = torch.nn.Linear(3, 2)
    live = floating_tensors(model)
    avg = FlatAverage(live)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(-1.0)
    avg.add(live, 0.5)
    calls = []
    monkeypatch.setattr(memmit.train.ensemble, "REDUCE_CHUNK", 3)  # 8 values: chunks of 3, 3, 2

    def two_processes(t):  # a stand-in for summing two processes' halves
        calls.append(t.numel())
        return t * 2
    avg.finish_round(two_processes)
    avg.load_into(live)
    assert calls == [3, 3, 2]
    assert torch.equal(model.weight, torch.full((2, 3), 3.0)) and torch.equal(model.bias, torch.full((2,), -1.0))
    assert torch.count_nonzero(avg.accumulator) == 0


def test_state_round_trip():
    model = torch.nn.Linear(2, 2)
    avg = FlatAverage(floating_tensors(model))
    avg.add(floating_tensors(model), 0.3)
    other = FlatAverage(floating_tensors(torch.nn.Linear(2, 2)))
    for part in ("average", "accumulator"):
        other.load_state_dict(part, avg.state_dict(part))
    assert torch.equal(other.average, avg.average) and torch.equal(other.accumulator, avg.accumulator)
