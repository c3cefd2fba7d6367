"""The AGC rule (docs/method.md) against hand computations."""

import pytest
import torch

from fractions import Fraction

import numpy as np

from memmit.train.agc import LossBank, exclusion_mask, kept_sum
from memmit.train.shards import ShardStream


def test_first_init_keeps_unset_then_skips_low_losses():
    bank = LossBank(num_timesteps=5, decay=0.8, init="first")
    losses = torch.tensor([1.0, 2.0, 0.4])
    t = torch.tensor([3, 1, 3])  # timestep 3 appears twice
    # Nothing set yet: everything kept.
    assert bank.keep_mask(losses, t, 0.5).tolist() == [True, True, True]
    bank.update(losses, t)
    # b[3]: first loss 1.0, then 0.8*1.0 + 0.2*0.4 = 0.88 (batch order); b[1] = 2.0.
    assert bank.values[3].item() == pytest.approx(0.88)
    assert bank.values[1].item() == pytest.approx(2.0)
    assert bank.is_set.tolist() == [False, True, False, True, False]

    # Next batch: thresholds 0.5*0.88 = 0.44 at t=3, 0.5*2.0 = 1.0 at t=1; t=0 unset -> kept.
    losses = torch.tensor([0.43, 0.45, 0.99, 1.0, 0.0])
    t = torch.tensor([3, 3, 1, 1, 0])
    assert bank.keep_mask(losses, t, 0.5).tolist() == [False, True, False, True, True]
    # The bank is updated with every sample, skipped or not.
    bank.update(losses, t)
    expected3 = 0.8 * (0.8 * 0.88 + 0.2 * 0.43) + 0.2 * 0.45
    expected1 = 0.8 * (0.8 * 2.0 + 0.2 * 0.99) + 0.2 * 1.0
    assert bank.values[3].item() == pytest.approx(expected3)
    assert bank.values[1].item() == pytest.approx(expected1)
    assert bank.values[0].item() == 0.0 and bool(bank.is_set[0])


def test_exempt_samples_are_kept_and_never_banked():
    bank = LossBank(num_timesteps=4, decay=0.5)
    bank.update(torch.tensor([1.0]), torch.tensor([2]))
    # Thresholds 0.5 * 1.0 at t=2; the exempt (anchored) 0.01 at t=2 and 0.2 at t=0 are kept, NaN never is.
    losses = torch.tensor([0.01, 0.3, 0.6, 0.2, float("nan")])
    t = torch.tensor([2, 2, 2, 0, 2])
    exempt = torch.tensor([True, False, False, True, True])
    assert bank.step(losses, t, 0.5, exempt).tolist() == [True, False, True, True, False]
    # Only 0.3 and 0.6 enter the bank: b[2] = 0.5 * (0.5 * 1.0 + 0.5 * 0.3) + 0.5 * 0.6; t=0 stays unset.
    assert bank.values[2].item() == pytest.approx(0.625)
    assert bank.is_set.tolist() == [False, False, True, False]


def test_all_skipped_batch():
    bank = LossBank(4, decay=0.5)
    bank.update(torch.tensor([1.0, 1.0]), torch.tensor([0, 2]))
    keep = bank.keep_mask(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 2, 2]), 0.5)
    assert not keep.any()


def test_zero_init_is_reference_warmup():
    bank = LossBank(3, decay=0.8, init="zero")
    losses, t = torch.tensor([0.001, 5.0]), torch.tensor([0, 1])
    # Entries start at 0: nothing is below lambda * 0, so nothing is skipped.
    assert bank.keep_mask(losses, t, 0.8).all()
    bank.update(losses, t)
    assert bank.values.tolist() == pytest.approx([0.2 * 0.001, 0.2 * 5.0, 0.0])


def test_lambda_zero_turns_agc_off():
    bank = LossBank(2)
    bank.update(torch.tensor([10.0]), torch.tensor([0]))
    assert bank.keep_mask(torch.tensor([0.0, 1e-9]), torch.tensor([0, 0]), 0.0).all()


def test_kept_sum_over_kept_samples_and_weights():
    losses = torch.tensor([1.0, 2.0, 4.0])
    keep = torch.tensor([True, False, True])
    assert kept_sum(losses, keep).item() == 5.0
    assert kept_sum(losses, keep, torch.tensor([0.5, 9.0, 0.25])).item() == 0.5 + 1.0


def test_nonfinite_losses_are_never_kept_and_never_enter_the_bank():
    bank = LossBank(4)
    bank.update(torch.tensor([float("nan"), 2.0, float("inf")]), torch.tensor([0, 1, 1]))
    # The NaN left entry 0 unset (AGC stays on there); the inf did not touch entry 1.
    assert bank.is_set.tolist() == [False, True, False, False] and bank.values[1].item() == 2.0
    bank.update(torch.tensor([1.0]), torch.tensor([0]))
    assert bank.values[0].item() == 1.0
    keep = bank.keep_mask(torch.tensor([float("nan"), 0.1, 5.0, float("-inf")]), torch.tensor([0, 1, 1, 3]), 0.5)
    assert keep.tolist() == [False, False, True, False]


def test_state_round_trip():
    bank = LossBank(3)
    bank.update(torch.tensor([1.0]), torch.tensor([2]))
    other = LossBank(3)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.values, bank.values) and torch.equal(other.is_set, bank.is_set)


def test_bad_init():
    with pytest.raises(ValueError, match="agc_bank_init"):
        LossBank(3, init="ones")


def test_exclusion_mask_rule():
    rng = np.random.RandomState(0)
    seen = rng.randint(0, 12, 500)
    skipped = np.minimum(rng.randint(0, 12, 500), seen)
    seen[:4], skipped[:4] = [4, 4, 3, 8], [2, 1, 3, 4]  # on the line, below it, too few visits, on it
    for threshold, min_visits in [(0.5, 4), (0.3, 1), (0.7, 1), (1.0, 2)]:
        expected = [s >= min_visits and Fraction(int(k), int(s)) >= Fraction(str(threshold))
                    for s, k in zip(seen, skipped)]
        assert exclusion_mask(seen, skipped, threshold, min_visits).tolist() == expected
    assert exclusion_mask(seen, skipped, 0.5, 4)[:4].tolist() == [True, False, False, True]
    assert exclusion_mask(np.array([100]), np.array([55]), 0.55, 1).tolist() == [True]  # 0.55 * 100 > 55 in floats


def test_stream_drop_leaves_ids_out_of_this_epoch_and_later_ones():
    stream = ShardStream(list(range(10, 30)), seed=3, shard=2)
    first = stream.next_batch(6).ids
    rest_before = stream.order[stream.cursor:].tolist()
    gone = [rest_before[0], rest_before[5], first[0]]
    stream.drop(gone)
    rest = stream.next_batch(100)  # the batch stops at the epoch's end
    assert list(rest.ids) == [i for i in rest_before if i not in gone]
    assert (rest.shard, rest.epoch, rest.positions) == (2, 0, tuple(range(6, 6 + len(rest.ids))))
    for epoch in range(1, 4):
        batch = stream.next_batch(100)
        assert sorted(batch.ids) == [i for i in range(10, 30) if i not in gone]
        assert batch.epoch == epoch and batch.positions == tuple(range(len(batch.ids)))
    copy = ShardStream([0], seed=0, shard=2)
    copy.load_state_dict(stream.state_dict())
    assert copy.peek(3, 7) == [copy.next_batch(7) for _ in range(3)] == [stream.next_batch(7) for _ in range(3)]


def test_binned_bank_shares_entries_among_consecutive_timesteps():
    bank = LossBank(10, decay=0.5, bins=2)  # timesteps 0-4 -> entry 0, 5-9 -> entry 1
    bank.update(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0, 4, 9]))
    assert bank.values.tolist() == [0.5 * 1.0 + 0.5 * 3.0, 2.0] and bank.is_set.all()
    # Every timestep of a bin is judged against the bin's entry: 0.5 * 2.0 = 1.0 for both.
    assert bank.keep_mask(torch.tensor([0.9, 1.1, 0.99]), torch.tensor([3, 5, 7]), 0.5).tolist() == [False, True, False]
    # Uneven bins: entry = t * bins // T.
    assert LossBank(1000, bins=3).entries(torch.tensor([0, 333, 334, 666, 667, 999])).tolist() == [0, 0, 1, 1, 2, 2]
    # bins = T is the paper's bank, entry for entry.
    assert LossBank(7, bins=7).entries(torch.arange(7)).tolist() == list(range(7))
    with pytest.raises(ValueError, match="resume needs the same agc_bank_bins"):
        LossBank(10, bins=5).load_state_dict(bank.state_dict())
    for bad in (0, 11):
        with pytest.raises(ValueError, match="agc_bank_bins must be between 1 and the 10 timesteps"):
            LossBank(10, bins=bad)
