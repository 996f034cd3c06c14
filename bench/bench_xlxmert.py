"""X-LXMERT grid / box feature extraction throughput, full X-152 architecture (random weights: same compute).

Baseline (named ``bare-loop``): upstream's ``coco_extract_grid_feature.py`` loop: read, decode and run one
image at a time in one process (``model.extract`` batch 1). Against it, the vlprep stage end to end
(``xlxmert.run``: plan, DataLoader decode workers, size-bucketed batches, parts streamed to disk, merge into
the HDF5), the detector loaded once beforehand for both. Prints images/s of each and the ratio.

The k-means and assignment benchmarks are ``bench/bench_kmeans.py`` (``--kmeans`` runs it after this one with
its defaults, in its own process).

Usage: python bench/bench_xlxmert.py [--images 4] [--kind grid8|boxes36] [--device cpu|cuda] [--batch-size 4]
       [--workers 2] [--arch full|tiny] [--autocast float16] [--kmeans]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlprep import stage, storage
from vlprep.data import images as imgs
from vlprep.sample import sample_dir
from vlprep.stages import xlxmert


def _images(tmp: str, n: int) -> Path:
    """``n`` sample photos under new names in a COCO train2014 folder."""
    src = sorted(Path(sample_dir(), "images").rglob("*.jpg"))
    folder = Path(tmp, "images", "train2014")
    folder.mkdir(parents=True)
    for i in range(n):
        shutil.copy(src[i % len(src)], folder / f"COCO_train2014_{i:012d}.jpg")
    return folder.parent


def bare_loop(model, items: list[str], kind: str) -> float:
    """Seconds for upstream's loop: one image at a time, decode then extract (batch 1)."""
    t0 = time.perf_counter()
    for uri in items:
        bgr, _ = imgs.decode_bgr(storage.read_bytes(uri), uri, exif=False)
        model.extract([bgr], kind, batch_size=1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--kind", default="grid8", choices=xlxmert.KINDS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--arch", default="full", choices=["full", "tiny"])
    ap.add_argument("--autocast", default="", help="stage only: e.g. float16 (CUDA)")
    ap.add_argument("--kmeans", action="store_true", help="then run bench/bench_kmeans.py")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = _images(tmp, args.images)
        items = imgs.list_images(str(root))
        runtime = stage.Runtime(device=args.device, batch_size=args.batch_size, num_workers=args.workers)
        base = xlxmert.Settings(images=str(root), kind=args.kind, arch=args.arch)
        model = xlxmert.detector_for(base, runtime)
        model.extract([imgs.decode_bgr(storage.read_bytes(items[0]), items[0])[0]], args.kind)  # warm-up
        serial = bare_loop(model, items, args.kind)

        settings = xlxmert.Settings(images=str(root), kind=args.kind, arch=args.arch, autocast=args.autocast)
        xlxmert.detector_for(settings, runtime)  # loaded before the clock starts (kept for the stage)
        t0 = time.perf_counter()
        summary = xlxmert.run(str(Path(tmp, "out")), settings, runtime=runtime)
        staged = time.perf_counter() - t0
        n = len(items)
        print(f"device {args.device}, {n} images, {args.kind}, arch {args.arch}, torch threads {torch.get_num_threads()}")
        print(f"bare-loop (baseline): {n / serial:7.3f} img/s")
        print(f"vlprep stage:         {n / staged:7.3f} img/s  (plan + extract + merge to HDF5; batch {args.batch_size}, "
              f"{args.workers} decode workers{', autocast ' + args.autocast if args.autocast else ''}; "
              f"model {summary['model_seconds'] / staged:.0%} of wall time)")
        print(f"ratio stage/bare-loop: {serial / staged:.2f}x")
    if args.kmeans:
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_kmeans.py"))], check=True)


if __name__ == "__main__":
    main()
