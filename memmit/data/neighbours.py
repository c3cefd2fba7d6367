"""Nearest-neighbour search over flattened images or embeddings, used by near-duplicate detection, anchor choice
and the memorization metrics alike: exact (torch, chunked so memory stays bounded, work quadratic in the rows), or,
for a search of a large set against itself, approximate with a faiss index (IVF, or HNSW), whose work grows
about linearly. Callers flatten their data to ``[num_items, dim]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import DEDUP_SEARCHES

_NORM_EPS = 1e-12  # same guard as torch.nn.functional.normalize
# `auto` searches exactly up to this many references: below it exact search takes seconds to minutes on a CPU,
# above it the quadratic work is hours (benchmarks/scale.py), and the index's recall is measured there.
EXACT_MAX = 100_000
IVF_MIN_ROWS = 1_000  # an IVF index trains its coarse clusters on the data: fewer rows train too few
IVF_POINTS_PER_LIST = 39  # faiss' minimum training points per coarse cluster
IVF_NPROBE = 16  # coarse clusters visited per query (faiss' default is 1: too low a recall for near copies)
HNSW_LINKS = 32  # graph neighbours per node (M)
HNSW_EF_SEARCH = 128  # candidates kept while searching


def default_device() -> torch.device:
    """The best available device: CUDA when present."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_search_args(queries: Tensor, refs: Tensor, k: int, metric: str,
                       query_chunk: int, ref_chunk: int) -> None:
    if queries.ndim != 2 or refs.ndim != 2 or queries.shape[1] != refs.shape[1]:
        raise ValueError(f"expected [M, D] and [N, D] tensors, got {tuple(queries.shape)} "
                         f"and {tuple(refs.shape)}")
    if not 1 <= k <= refs.shape[0]:
        raise ValueError(f"k must be in [1, {refs.shape[0]}] (number of references), got {k}")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if query_chunk < 1 or ref_chunk < 1:
        raise ValueError("query_chunk and ref_chunk must be positive")


def nearest_neighbours(queries: Tensor, refs: Tensor, k: int, *, metric: str = "l2",
                       query_chunk: int = 1024, ref_chunk: int = 8192,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Exact k nearest ``refs`` per query: squared L2 ascending or cosine descending.

    Scores one ``query_chunk x ref_chunk`` block at a time, keeps its k best and merges them with the k best so
    far; returns CPU [M, k] tensors. A block costs one matrix product and one top-k, nothing more: for L2 the
    product is ``||r||^2 - 2 q.r`` (one addmm), which ranks references as the distance does, ``||q||^2`` being
    the same along a row; it is added to the k winners only.
    """
    _check_search_args(queries, refs, k, metric, query_chunk, ref_chunk)
    device = torch.device(device) if device is not None else default_device()
    largest = metric == "cosine"
    # Refs are converted (and normalised, for cosine) once rather than once per query chunk.
    ref_chunks = [(start, _prepared(refs[start:start + ref_chunk], device, dtype, metric))
                  for start in range(0, refs.shape[0], ref_chunk)]
    ref_norms_sq = [r.square().sum(1)[None, :] for _, r in ref_chunks] if metric == "l2" else None
    values, indices = [], []
    for q_start in range(0, queries.shape[0], query_chunk):
        q = _prepared(queries[q_start:q_start + query_chunk], device, dtype, metric)
        best_v = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=device)
        for j, (r_start, r) in enumerate(ref_chunks):
            block = torch.addmm(ref_norms_sq[j], q, r.T, alpha=-2) if metric == "l2" else q @ r.T
            block_v, block_i = block.topk(min(k, block.shape[1]), dim=1, largest=largest)
            cand_v, cand_i = torch.cat([best_v, block_v], dim=1), torch.cat([best_i, block_i + r_start], dim=1)
            best_v, pos = cand_v.topk(min(k, cand_v.shape[1]), dim=1, largest=largest)
            best_i = cand_i.gather(1, pos)
        if metric == "l2":
            # ||q||^2 - 2 q.r + ||r||^2 can dip below 0 by rounding error.
            best_v = best_v.add_(q.square().sum(1)[:, None]).clamp_(min=0)
        values.append(best_v.cpu())
        indices.append(best_i.cpu())
    return torch.cat(values), torch.cat(indices)


def _prepared(x: Tensor, device: torch.device, dtype: torch.dtype, metric: str) -> Tensor:
    """Rows on the device in the search dtype; unit length for cosine (a zero row stays zero)."""
    x = x.to(device, dtype)
    return x if metric == "l2" else x / x.norm(dim=1, keepdim=True).clamp_(min=_NORM_EPS)


def collapse_duplicates(refs: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct rows of ``refs`` and, per original row, the index of its distinct row."""
    return torch.unique(refs, dim=0, return_inverse=True)


def first_occurrence(inverse: Tensor, num_unique: int) -> Tensor:
    """For each distinct row, the smallest original row index mapping to it."""
    first = torch.full((num_unique,), inverse.numel(), dtype=torch.long, device=inverse.device)
    rows = torch.arange(inverse.numel(), device=inverse.device)
    return first.scatter_reduce_(0, inverse, rows, reduce="amin")


def resolve_search(search: str, num_refs: int) -> str:
    """The search `search` names for this many references: `auto` is exact up to EXACT_MAX, IVF above; an index
    that cannot fit the data is refused by name."""
    if search not in DEDUP_SEARCHES:
        raise ValueError(f"dedup_search {search!r} is not one of {list(DEDUP_SEARCHES)}")
    if search == "auto":
        return "exact" if num_refs <= EXACT_MAX else "ivf"
    if search == "ivf" and num_refs < IVF_MIN_ROWS:
        raise ValueError(f"dedup_search=ivf trains its index on the data and needs at least {IVF_MIN_ROWS:,} rows; "
                         f"this data has {num_refs:,}: use exact (auto does)")
    return search


def index_nearest_neighbours(rows: Tensor, k: int, search: str, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """Each row's k nearest rows (itself usually first) by a faiss index, `search` "ivf" or "hnsw": squared L2
    ascending or cosine descending, as nearest_neighbours returns them; an index that finds fewer than k gives
    index -1 there. Approximate: benchmarks/scale.py measures its recall against exact search. With a faiss-gpu
    build and a GPU, the IVF index is built and searched on every GPU (faiss has no GPU HNSW)."""
    import faiss  # only this path needs it

    _check_search_args(rows, rows, k, metric, 1, 1)
    x = _prepared(rows, torch.device("cpu"), torch.float32, metric).contiguous().numpy()
    n, d = x.shape
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if search == "ivf":
        lists = max(1, min(int(4 * n ** 0.5), n // IVF_POINTS_PER_LIST))
        index = faiss.IndexIVFFlat(faiss.IndexFlat(d, faiss_metric), d, lists, faiss_metric)
        if faiss.get_num_gpus() > 0:  # a faiss-gpu build on a GPU machine (faiss-cpu says 0): IVF runs there
            index = faiss.index_cpu_to_all_gpus(index)
        # Training on an evenly spaced subset: k-means needs ~40-256 points per list, not all of a million rows.
        index.train(x[::max(1, n // (256 * lists))])
        index.nprobe = min(IVF_NPROBE, lists)
    elif search == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_LINKS, faiss_metric)
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
    else:
        raise ValueError(f"no faiss index for search {search!r}")
    index.add(x)
    values, indices = index.search(x, k)
    return torch.from_numpy(values), torch.from_numpy(indices).long()
