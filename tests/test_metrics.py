"""Tests for memmit.eval.metrics and memmit.data.neighbours against brute-force and hand-computed values."""

import math

import pytest
import torch

from memmit.data.neighbours import collapse_duplicates, first_occurrence, nearest_neighbours
from memmit.eval.metrics import (cosine_similarity_stats, frechet_distance, memorization_report,
                                 memorized_fraction_by_threshold, neighbourhood_normalised_score, nn_ratio_memorized)

# Training set with two duplicated images: rows 0/2 are (0, 0) and rows 1/4 are (3, 4).
TRAIN = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [6.0, 8.0], [3.0, 4.0], [20.0, 0.0]])
SAMPLES = torch.tensor([
    [0.0, 0.0],    # exact copy of the duplicated (0, 0)
    [3.3, 4.4],    # near the duplicated (3, 4)
    [10.0, 10.0],  # between images, not memorized
    [0.5, 0.0],    # near the duplicated (0, 0)
    [20.0, 1.0],   # near the single (20, 0)
])
# Hand-computed squared distances to the distinct images (0,0), (3,4), (6,8), (20,0).
SQ_D1 = [0.0, 0.25, 20.0, 0.25, 1.0]
SQ_D2 = [25.0, 20.25, 85.0, 22.25, 245.0]
SQ_D3 = [100.0, 30.25, 200.0, 94.25, 298.0]
NEAREST_ORIGINAL = [0, 1, 3, 0, 5]
MEMORIZED = [True, True, False, True, True]


def brute_force(queries, refs, k, metric):
    """Full-matrix reference search in float64."""
    q, r = queries.double(), refs.double()
    if metric == "l2":
        return torch.cdist(q, r).square().topk(k, dim=1, largest=False)
    sims = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(r, dim=1).T
    return sims.topk(k, dim=1)


def sqrtm_psd(mat):
    """Square root of a symmetric PSD matrix by eigendecomposition."""
    w, v = torch.linalg.eigh(mat)
    return v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T


def fid_reference(a, b):
    """FID via sqrtm(sqrt(S_a) S_b sqrt(S_a)), independent of torchmetrics."""
    a, b = a.double(), b.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    root_a = sqrtm_psd(sa)
    cross = sqrtm_psd(root_a @ sb @ root_a)
    return ((a.mean(0) - b.mean(0)).square().sum() + torch.trace(sa + sb - 2 * cross)).item()


def with_moments(n, mean, cov, seed):
    """n samples whose empirical mean and (unbiased) covariance are exactly mean and cov."""
    x = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    whiten = torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T)))
    return x @ whiten.T @ torch.linalg.cholesky(cov).T + mean


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("query_chunk,ref_chunk", [(1, 1), (3, 4), (10, 16), (37, 53), (64, 256)])
def test_chunked_search_matches_brute_force(metric, query_chunk, ref_chunk):
    gen = torch.Generator().manual_seed(0)
    queries, refs = torch.randn(37, 7, generator=gen), torch.randn(53, 7, generator=gen)
    for k in (1, 5, 53):
        values, indices = nearest_neighbours(queries, refs, k, metric=metric, device="cpu",
                                             query_chunk=query_chunk, ref_chunk=ref_chunk,
                                             dtype=torch.float64)
        expected_values, expected_indices = brute_force(queries, refs, k, metric)
        assert values.shape == indices.shape == (37, k)
        torch.testing.assert_close(values, expected_values)
        assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_float32_search_is_close_and_ordered(metric):
    gen = torch.Generator().manual_seed(1)
    queries, refs = torch.rand(20, 96, generator=gen), torch.rand(45, 96, generator=gen)
    values, indices = nearest_neighbours(queries, refs, 6, metric=metric, query_chunk=7,
                                         ref_chunk=8, device="cpu")
    expected_values, _ = brute_force(queries, refs, 6, metric)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values.double(), expected_values, rtol=1e-4, atol=1e-4)
    steps = values.diff(dim=1)
    assert bool((steps >= 0).all() if metric == "l2" else (steps <= 0).all())


def test_search_rejects_k_above_number_of_references():
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbours(torch.zeros(2, 3), torch.zeros(4, 3), 5, device="cpu")


def test_collapse_duplicates_and_first_occurrence():
    unique, inverse = collapse_duplicates(TRAIN)
    assert unique.shape == (4, 2)
    assert torch.equal(unique[inverse], TRAIN)
    first = first_occurrence(inverse, unique.shape[0])
    assert sorted(first.tolist()) == [0, 1, 3, 5]
    assert torch.equal(TRAIN[first], unique)


def test_nn_ratio_criterion_hand_computed():
    memorized = nn_ratio_memorized(torch.tensor(SQ_D1), torch.tensor(SQ_D2))
    assert memorized.tolist() == MEMORIZED
    # Ratios 1/9 and sqrt(20/85) ~ 0.485 bracket the 1/3 threshold.
    assert nn_ratio_memorized(torch.tensor([0.25]), torch.tensor([20.25]), threshold=0.12).item()
    assert not nn_ratio_memorized(torch.tensor([0.25]), torch.tensor([20.25]), threshold=0.11).item()


def test_nn_ratio_with_zero_second_distance():
    # Only an exact copy counts as memorized when d2 == 0.
    assert nn_ratio_memorized(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0])).tolist() == [
        True, False]


def test_duplicates_would_hide_memorization_without_collapsing():
    values, _ = nearest_neighbours(SAMPLES, TRAIN, 2, device="cpu")
    assert values[0].tolist() == [0.0, 0.0]  # raw d2 of the exact copy is 0
    raw = nn_ratio_memorized(values[:, 0], values[:, 1])
    # Near-copies of duplicated images have d1 == d2 among raw rows, hence ratio 1.
    assert not raw[1].item() and not raw[3].item()
    report = memorization_report(SAMPLES, TRAIN, device="cpu")
    assert report["per_sample"]["memorized"].tolist() == MEMORIZED


def test_neighbourhood_normalised_score_hand_computed():
    sq = torch.tensor([SQ_D1, SQ_D2, SQ_D3], dtype=torch.float64).T
    expected = [0.0, 0.75 / 50.75, 60 / 305, 0.75 / 116.75, 3 / 544]
    torch.testing.assert_close(neighbourhood_normalised_score(sq),
                               torch.tensor(expected, dtype=torch.float64))
    fractions = memorized_fraction_by_threshold(torch.tensor(expected))
    assert list(fractions) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert fractions[0.1] == pytest.approx(0.8)
    assert all(fractions[t] == 1.0 for t in list(fractions)[1:])


def test_l2_report_hand_computed():
    report = memorization_report(SAMPLES, TRAIN, k=3, device="cpu")
    summary, per_sample = report["summary"], report["per_sample"]
    assert per_sample["nearest_index"].tolist() == NEAREST_ORIGINAL
    torch.testing.assert_close(per_sample["d1"].double(),
                               torch.tensor(SQ_D1, dtype=torch.float64).sqrt(), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_sample["d2"].double(),
                               torch.tensor(SQ_D2, dtype=torch.float64).sqrt(), atol=1e-4, rtol=0)
    assert per_sample["ratio"][1].item() == pytest.approx(1 / 9, abs=1e-4)
    assert per_sample["nn_score"][2].item() == pytest.approx(60 / 305, rel=1e-5)
    assert summary["k"] == 3 and summary["num_distinct_train"] == 4
    assert summary["fraction_memorized_ratio"] == pytest.approx(0.8)
    assert summary["fraction_memorized_by_score"][0.1] == pytest.approx(0.8)
    assert list(summary["copied_counts"].items()) == [(0, 2), (1, 1), (5, 1)]


def test_copied_counts_refer_to_original_rows():
    # Permute the training rows so distinct-row order differs from the original order.
    perm = torch.tensor([5, 3, 1, 4, 0, 2])
    report = memorization_report(SAMPLES, TRAIN[perm], device="cpu")
    counts = report["summary"]["copied_counts"]
    # (0, 0) sits at permuted rows 4 and 5, (3, 4) at 2 and 3, (20, 0) at 0.
    assert list(counts.items()) == [(4, 2), (0, 1), (2, 1)]


def test_report_clips_k_to_distinct_images_and_validates():
    report = memorization_report(SAMPLES, TRAIN, k=50, device="cpu")
    assert report["summary"]["k"] == 4
    torch.testing.assert_close(report["per_sample"]["nn_score"][2].double(),
                               torch.tensor(20 / ((20 + 85 + 200 + 200) / 4), dtype=torch.float64))
    with pytest.raises(ValueError, match="two distinct"):
        memorization_report(SAMPLES, torch.zeros(3, 2), device="cpu")
    with pytest.raises(ValueError, match="k >= 2"):
        memorization_report(SAMPLES, TRAIN, k=1, device="cpu")


def test_cosine_report_and_stats():
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    samples = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
    report = memorization_report(samples, train, metric="cosine", device="cpu")
    per_sample, summary = report["per_sample"], report["summary"]
    assert per_sample["nearest_index"].tolist() == [0, 2, 2]
    torch.testing.assert_close(per_sample["max_cos"], torch.tensor([1.0, 0.0, 1.0]))
    assert summary["cosine"]["mean"] == pytest.approx(2 / 3)
    assert summary["cosine"]["frac_above_0_5"] == pytest.approx(2 / 3)
    assert list(summary["copied_counts"].items()) == [(0, 1), (2, 1)]


def test_cosine_similarity_stats_hand_computed():
    stats = cosine_similarity_stats(torch.arange(21, dtype=torch.float64) / 20)
    assert stats["mean"] == pytest.approx(0.5)
    assert stats["p95"] == pytest.approx(0.95)
    assert stats["frac_above_0_5"] == pytest.approx(10 / 21)


def test_frechet_distance_identical_sets_is_zero():
    feats = torch.randn(300, 8, generator=torch.Generator().manual_seed(2))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_closed_form_diagonal_gaussians():
    a = with_moments(200, torch.zeros(3, dtype=torch.float64),
                     torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)), seed=3)
    b = with_moments(150, torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64),
                     torch.diag(torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)), seed=4)
    # ||mu_a - mu_b||^2 = 9 plus sum (sqrt(var_a) - sqrt(var_b))^2 = 1 + 1 + 0.
    assert frechet_distance(a, b) == pytest.approx(11.0, rel=1e-8)


def test_frechet_distance_matches_eigh_sqrtm():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(120, 6, generator=gen) @ torch.randn(6, 6, generator=gen)
    b = torch.randn(90, 6, generator=gen) @ torch.randn(6, 6, generator=gen) + 0.5
    assert frechet_distance(a, b) == pytest.approx(fid_reference(a, b), rel=1e-6)
    assert math.isfinite(frechet_distance(a[:, :1], b[:, :1]))
