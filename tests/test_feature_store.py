"""Detector features on disk (data/feature_store.py): split across processes, resumable, refused when foreign."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import ImageEnhance

from memmit.data import feature_store
from memmit.data.detectors import load_detector
from memmit.data.feature_store import FeatureStore, stored_features, store_for
from memmit.workers import Workers
from memmit.data.split import duplicate_clusters
from conftest import mnist_images

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 7  # rows per chunk in these tests: 45 images make 6 full chunks and a partial one


def with_copies(n: int = 40) -> datasets.Dataset:
    """Real MNIST digits and five near copies of three of them (brightened, re-encoded)."""
    images, _ = mnist_images(n)
    copies = [ImageEnhance.Brightness(images[i]).enhance(1.1) for i in (3, 3, 17)] + [images[29].copy(),
                                                                                       images[5].copy()]
    return datasets.Dataset.from_dict({"image": images + copies}).cast_column("image", datasets.Image())


@pytest.fixture
def chunked(monkeypatch):
    monkeypatch.setattr(feature_store, "CHUNK_ROWS", CHUNK)


@pytest.mark.parametrize("kind", ["pixels", "phash"])
def test_stored_features_are_the_computed_ones_and_give_the_same_clusters(kind, chunked, tmp_path):
    ds = with_copies()
    detector = load_detector(kind, None, 16, 1)
    images = list(ds["image"])
    feats = stored_features(detector, ds, "image", directory=str(tmp_path / "f"))
    assert torch.equal(feats, detector.features(images))
    assert len(list((tmp_path / "f").glob("chunk-*.npy"))) == 7
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["rows"] == 45 and manifest["dtype"] == detector.storage_dtype
    clusters = duplicate_clusters(ds, "image", detector, show_progress=False, features_dir=str(tmp_path / "f"))
    assert clusters == detector.clusters(images)
    assert [3, 40, 41] in clusters and [5, 44] in clusters and [29, 43] in clusters  # the planted copies


def test_phash_features_are_stored_as_bits(chunked, tmp_path):
    detector = load_detector("phash", None, 16, 1)
    stored_features(detector, with_copies(), "image", directory=str(tmp_path))
    chunk = np.load(tmp_path / "chunk-000000.npy")
    assert chunk.dtype == np.int8 and set(np.unique(chunk)) <= {-1, 1}


def test_a_killed_run_resumes_at_the_chunks_it_had_not_written(chunked, tmp_path):
    """What a kill leaves: some chunks written whole, a temporary file half-written. The rerun keeps the former,
    drops the latter and computes only what is missing."""
    ds, detector = with_copies(), load_detector("pixels", None, 16, 1)
    store = store_for(detector, ds, "image", str(tmp_path), show_progress=False)
    store.open()
    store.compute(detector, ds, "image", Workers(index=1, count=2), show_progress=False)  # the odd chunks only
    assert store.missing() == [0, 2, 4, 6]
    (tmp_path / ".chunk-000000.1234.tmp").write_bytes(b"half")
    written = {c: store.chunk(c).stat().st_mtime_ns for c in (1, 3, 5)}
    feats = stored_features(detector, ds, "image", directory=str(tmp_path))
    assert {c: store.chunk(c).stat().st_mtime_ns for c in (1, 3, 5)} == written
    assert not list(tmp_path.glob("*.tmp")) and store.missing() == []
    assert torch.equal(feats, detector.features(list(ds["image"])))


def test_features_of_another_dataset_or_detector_are_refused(chunked, tmp_path):
    ds, pixels = with_copies(), load_detector("pixels", None, 16, 1)
    stored_features(pixels, ds, "image", directory=str(tmp_path))
    other = ds.select(range(44))
    with pytest.raises(ValueError, match=r"another dataset's images, another number of images .*dedup_features_dir"):
        stored_features(pixels, other, "image", directory=str(tmp_path))
    with pytest.raises(ValueError, match="another detector's features"):
        stored_features(load_detector("pixels", None, 8, 1), ds, "image", directory=str(tmp_path))
    # The threshold is not part of the features: the eval's looser detector reuses them.
    assert torch.equal(stored_features(load_detector("pixels", None, 16, 1, use="eval"), ds, "image",
                                         directory=str(tmp_path)), pixels.features(list(ds["image"])))
    np.save(tmp_path / "chunk-000002.npy", np.zeros((CHUNK, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="chunk-000002.npy holds float32 rows of shape \\(7, 3\\)"):
        stored_features(pixels, ds, "image", directory=str(tmp_path))
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="holds feature chunks and no manifest.json"):
        stored_features(pixels, ds, "image", directory=str(tmp_path))


def test_a_features_folder_that_cannot_be_created_is_an_error_naming_the_option(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="dedup_features_dir .*a-file/features' cannot be created"):
        stored_features(load_detector("pixels", None, 16, 1), with_copies(), "image",
                        directory=str(tmp_path / "a-file" / "features"))


def test_a_training_run_refuses_a_features_folder_of_other_data(tiny_pipeline, digits_dir, tmp_path, capsys):
    from memmit.cli import train_main

    folder = tmp_path / "features"
    stored_features(load_detector("pixels", None, 16, 1), with_copies(), "image", directory=str(folder))
    code = train_main(["--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name", digits_dir,
                       "--output_dir", str(tmp_path / "out"), "--dedup", "keep_one", "--dedup_features_dir",
                       str(folder), "--num_shards", "2", "--report_to", "none"])
    assert code == 2
    assert f"{folder} holds another dataset's images" in capsys.readouterr().err
    assert not (tmp_path / "out" / "unet").exists()


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, "tests")
    from memmit.data import feature_store
    from memmit.data.detectors import load_detector
    from test_feature_store import CHUNK, with_copies
    feature_store.CHUNK_ROWS = CHUNK
    ds = with_copies()
    # A file-size limit makes every write past it fail with EFBIG, as a full disk fails with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
    try:
        feature_store.stored_features(load_detector("pixels", None, 16, 1), ds, "image", directory=sys.argv[1])
    except ValueError as exc:
        print(exc)
""")


def test_a_disk_that_fills_is_an_error_naming_the_folder_and_leaves_nothing_half_written(tmp_path):
    folder = tmp_path / "features"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(folder)], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"no room to write chunk-000000.npy in {folder}" in out.stdout
    assert "0 of 7 chunks are written" in out.stdout  # a chunk of 7 rows of 16 x 16 floats is over 2 KiB
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]


def _two_workers(rank: int, folder: str, port: int, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    feature_store.CHUNK_ROWS = CHUNK

    def share(value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    detector, computed = load_detector("pixels", None, 16, 1), []
    features = detector.features
    detector.features = lambda images: computed.append(len(images := list(images))) or features(images)
    clusters = duplicate_clusters(with_copies(), "image", detector, False, workers=Workers(rank, 2, dist.barrier, share),
                                  features_dir=folder)
    Path(results, f"{rank}.json").write_text(json.dumps({"clusters": clusters, "computed": computed}))
    dist.destroy_process_group()


def test_two_processes_share_the_chunks_and_both_get_the_main_process_clusters(chunked, tmp_path):
    folder, results = tmp_path / "features", tmp_path / "results"
    results.mkdir()
    mp.spawn(_two_workers, args=(str(folder), 29400 + os.getpid() % 500, str(results)), nprocs=2)
    ds, detector = with_copies(), load_detector("pixels", None, 16, 1)
    expected = detector.clusters(list(ds["image"]))
    zero, one = (json.loads((results / f"{rank}.json").read_text()) for rank in (0, 1))
    assert zero["clusters"] == one["clusters"] == expected
    assert zero["computed"] == [7, 7, 7, 3] and one["computed"] == [7, 7, 7]  # chunks 0, 2, 4, 6 and 1, 3, 5
    store = FeatureStore(folder, json.loads((folder / "manifest.json").read_text()))
    assert store.missing() == [] and torch.equal(store.read(), detector.features(list(ds["image"])))
