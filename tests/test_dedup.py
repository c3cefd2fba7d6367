"""Tests for memmit.data.dedup on hand-built and real (MNIST) images."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import mnist_images
from memmit.data.dedup import cluster_report, find_duplicate_clusters

# Per-pixel RMS distance in [-1, 1] units (~6 grey levels) on raw pixels: far above +-1 grey-level noise, far
# below the 0.16 between the closest of 64 distinct MNIST digits at 16x16.
RAW_PIXEL_THRESHOLD = 0.05
from memmit.data.split import keep_one, split_with_clusters


def random_images(n: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, dim, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_exact_and_near_copies_are_clustered_distinct_images_are_not():
    base = random_images(6)
    noise = 0.01 * random_images(1, seed=1)[0]  # RMS ~0.006, far under the threshold
    # 0/2/7 are exact copies; 1/4 near copies; 3, 5, 6, 8 distinct.
    images = torch.stack([base[0], base[1], base[0], base[2], base[1] + noise, base[3],
                          base[4], base[0], base[5]])
    expected = [[0, 2, 7], [1, 4]]
    assert find_duplicate_clusters(images, RAW_PIXEL_THRESHOLD, device="cpu") == expected
    # Tiny chunks and a tiny k give the same answer.
    assert find_duplicate_clusters(images, RAW_PIXEL_THRESHOLD, k_max=1, query_chunk=2, ref_chunk=3,
                                   pair_chunk=1, device="cpu") == expected


def test_threshold_boundary_by_hand():
    # D = 16; rows differ in one pixel by c, so RMS distance = c / sqrt(16) = c / 4.
    a = torch.full((16,), 0.9)
    below, above, far = a.clone(), a.clone(), -a
    below[3] -= 0.199  # RMS 0.04975 <= 0.05
    above[7] -= 0.201  # RMS 0.05025 >  0.05; and ~0.071 from `below`
    images = torch.stack([a, far, below, above])
    assert find_duplicate_clusters(images, 0.05, device="cpu") == [[0, 2]]
    assert find_duplicate_clusters(images, 0.0502, device="cpu") == [[0, 2]]
    # Average linkage: 3 is within 0.0503 of 0, but not on average of {0, 2} (0.0605)...
    assert find_duplicate_clusters(images, 0.0503, device="cpu") == [[0, 2]]
    assert find_duplicate_clusters(images, 0.061, device="cpu") == [[0, 2, 3]]
    assert find_duplicate_clusters(images, 0.0, device="cpu") == []


def test_a_chain_of_pairwise_close_images_is_not_merged_end_to_end():
    """Ten images on a line, each 0.04 (RMS) from the next: single linkage at 0.05 would make them one
    cluster, though the ends are 0.36 apart. Average linkage keeps every cluster's spread within 0.05."""
    from memmit.data.dedup import rms_distance

    direction = random_images(1, dim=256, seed=3)[0]
    direction = direction / direction.square().mean().sqrt()  # unit RMS
    images = torch.stack([0.04 * k * direction for k in range(10)])
    consecutive = rms_distance(images[:-1], images[1:])
    assert torch.allclose(consecutive, torch.full((9,), 0.04, dtype=torch.float64))
    clusters = find_duplicate_clusters(images, 0.05, device="cpu")
    assert clusters and all(len(c) <= 2 for c in clusters)
    for c in clusters:
        pairs = torch.combinations(torch.tensor(c))
        assert rms_distance(images[pairs[:, 0]], images[pairs[:, 1]]).mean() <= 0.05


def test_clusters_larger_than_k_are_found_whole():
    base = random_images(22)
    exact = base[0].expand(40, -1)
    near = base[1] + 0.005 * random_images(40, seed=2)
    images = torch.cat([exact, near, base[2:]])  # 40 + 40 + 20 distinct
    clusters = find_duplicate_clusters(images, RAW_PIXEL_THRESHOLD, k_max=16, device="cpu")
    assert clusters == [list(range(40)), list(range(40, 80))]


def test_input_checks():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        find_duplicate_clusters(torch.zeros(4), RAW_PIXEL_THRESHOLD)
    with pytest.raises(ValueError, match="threshold"):
        find_duplicate_clusters(torch.zeros(3, 4), -0.1)
    assert find_duplicate_clusters(torch.zeros(1, 4), RAW_PIXEL_THRESHOLD, device="cpu") == []


def test_keep_one_keeps_smallest_id_per_cluster_and_all_singletons():
    assert keep_one(8, [[5, 2, 7], [1, 3]]) == [0, 1, 2, 4, 6]
    assert keep_one(3, []) == [0, 1, 2]
    with pytest.raises(ValueError, match="two clusters"):
        keep_one(8, [[1, 2], [2, 3]])
    with pytest.raises(ValueError, match="out of range"):
        keep_one(3, [[1, 3]])


CLUSTERS = [[0, 1, 2, 3, 4], [10, 20], [7, 8, 9]]


@pytest.mark.parametrize("seed", range(5))
def test_split_with_clusters_keeps_clusters_whole_and_balanced(seed):
    shards = split_with_clusters(30, 4, CLUSTERS, seed=seed)
    assert len(shards) == 4 and all(shards)
    assert sorted(i for s in shards for i in s) == list(range(30))
    assert all(s == sorted(s) for s in shards)
    for cluster in CLUSTERS:
        assert sum(set(cluster) <= set(s) for s in shards) == 1
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 5
    assert split_with_clusters(30, 4, CLUSTERS, seed=seed) == shards


def test_split_with_clusters_seeds_differ_and_plain_split_is_even():
    splits = {str(split_with_clusters(30, 4, CLUSTERS, seed=s)) for s in range(5)}
    assert len(splits) > 1
    # No clusters: greedy filling gives sizes 4, 3, 3.
    assert [len(s) for s in split_with_clusters(10, 3, [])] == [4, 3, 3]


def test_split_with_clusters_errors():
    # 5 samples, one cluster of 4: two units.
    assert [len(s) for s in split_with_clusters(5, 2, [[0, 1, 2, 3]])] in ([4, 1], [1, 4])
    with pytest.raises(ValueError, match="num_shards=3 .* between 1 and 2"):
        split_with_clusters(5, 3, [[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="stratified"):
        split_with_clusters(5, 2, [], strategy="stratified")


def test_cluster_report():
    sources = [f"img{i}.png" for i in range(6)]
    report = cluster_report([[0, 3, 4], [1, 5]], sources)
    assert report == {"num_clusters": 2, "num_samples_in_clusters": 5, "largest_cluster": 3,
                      "clusters": [{"size": 3, "ids": [0, 3, 4],
                                    "sources": ["img0.png", "img3.png", "img4.png"]},
                                   {"size": 2, "ids": [1, 5],
                                    "sources": ["img1.png", "img5.png"]}]}
    many = cluster_report([[2 * i, 2 * i + 1] for i in range(60)], [str(i) for i in range(120)])
    assert many["num_clusters"] == 60 and len(many["clusters"]) == 50
    assert cluster_report([], [])["largest_cluster"] == 0


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32)).flatten() / 127.5 - 1


def test_real_digits_with_duplicates():
    digits, _ = mnist_images(64)
    pixels = [np.array(d.resize((16, 16), Image.BILINEAR), dtype=np.int16) for d in digits]
    distinct = torch.stack([to_tensor(p) for p in pixels])
    sq_dists = torch.cdist(distinct.double(), distinct.double()).square()
    closest = (sq_dists + torch.eye(64) * 1e9).min().sqrt().item() / 16
    print(f"closest distinct digits: RMS {closest:.4f} = {closest / RAW_PIXEL_THRESHOLD:.1f}x threshold")
    assert closest > 3 * RAW_PIXEL_THRESHOLD

    rng = np.random.default_rng(0)
    copies, expected = [], []
    for digit in (5, 20, 41):  # 4 extra copies each (5 in all); two of them with +-1 grey noise
        ids = [digit]
        for c in range(4):
            noise = rng.choice([-1, 1], size=pixels[digit].shape) if c % 2 else 0
            ids.append(64 + len(copies))
            copies.append(to_tensor(np.clip(pixels[digit] + noise, 0, 255)))
        expected.append(ids)
    images = torch.cat([distinct, torch.stack(copies)])
    assert torch.unique(images, dim=0).shape[0] == 64 + 6  # the noisy copies are not exact
    assert find_duplicate_clusters(images, RAW_PIXEL_THRESHOLD, device="cpu") == expected


@pytest.mark.parametrize("search", ["ivf", "hnsw"])
def test_an_index_search_finds_the_clusters_exact_search_finds(search):
    """Where both run, the faiss path gives the exact path's clusters (benchmarks/scale.py measures recall at
    sizes exact search cannot reach)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from scale import cosine_distance, planted

    rows, families = planted(3000, 32, copies=3)
    exact = find_duplicate_clusters(rows, 0.05, cosine_distance, search_metric="cosine", search="exact")
    assert sorted(map(sorted, exact)) == sorted(map(sorted, families))
    assert find_duplicate_clusters(rows, 0.05, cosine_distance, search_metric="cosine", search=search) == exact


def test_a_faiss_gpu_build_moves_the_ivf_index_to_the_gpus(monkeypatch):
    """No GPU here: faiss is made to report one, and its move to the GPUs hands the CPU index back, recorded. What
    this pins is the routing (IVF moves, HNSW, which faiss cannot run on a GPU, stays), not GPU arithmetic."""
    import faiss

    from memmit.data.neighbours import IVF_MIN_ROWS, index_nearest_neighbours

    moved = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: moved.append(type(index).__name__) or index)
    rows = torch.randn(IVF_MIN_ROWS, 8, generator=torch.Generator().manual_seed(0))
    _, ivf = index_nearest_neighbours(rows, 2, "ivf")
    _, hnsw = index_nearest_neighbours(rows, 2, "hnsw")
    assert moved == ["IndexIVFFlat"]
    assert torch.equal(ivf[:, 0], torch.arange(len(rows))) and torch.equal(hnsw[:, 0], torch.arange(len(rows)))


def test_the_search_is_chosen_by_size_and_an_index_that_cannot_fit_is_refused():
    from memmit.data.neighbours import EXACT_MAX, IVF_MIN_ROWS, resolve_search

    assert resolve_search("auto", EXACT_MAX) == "exact" and resolve_search("auto", EXACT_MAX + 1) == "ivf"
    assert resolve_search("hnsw", 10) == "hnsw" and resolve_search("ivf", IVF_MIN_ROWS) == "ivf"
    with pytest.raises(ValueError, match="dedup_search=ivf trains its index on the data and needs at least 1,000 rows; "
                                         "this data has 24: use exact"):
        resolve_search("ivf", 24)
    with pytest.raises(ValueError, match="dedup_search 'annoy' is not one of"):
        resolve_search("annoy", 24)


def test_an_index_that_cannot_fit_the_data_fails_before_training(tiny_pipeline, digits_dir, tmp_path, capsys):
    from memmit.cli import train_main

    from test_train import args

    assert train_main(args(tiny_pipeline, digits_dir, tmp_path / "out", "--dedup_search", "ivf")) == 2
    assert "dedup_search=ivf trains its index on the data" in capsys.readouterr().err
    assert not (tmp_path / "out" / "memmit").exists()
