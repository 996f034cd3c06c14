"""Region-feature extraction throughput, full R-101 C4 architecture (random weights: same compute).

Baseline (named ``serial``): upstream's loop — read, decode and run one image at a time in one
process (``generate_tsv.py`` / ``extract_coco_image.py`` style). Against it, the vlprep stage
(``regions.extract``: DataLoader decode workers, size-bucketed batches). Prints images/s of each,
the ratio stage/serial and the share of wall time spent decoding vs in the model.
Usage: python bench/bench_regions.py [--images 8] [--device cpu|cuda] [--batch-size 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vlprep import stage, storage
from vlprep.data import images as imgs
from vlprep.sample import sample_dir
from vlprep.stages import regions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--recipe", default="caffe36")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        src = sorted(Path(sample_dir(), "images").rglob("*.jpg"))
        folder = Path(tmp, "images", "val2014")
        folder.mkdir(parents=True)
        for i in range(args.images):  # sample photos, repeated under new names
            shutil.copy(src[i % len(src)], folder / f"COCO_val2014_{i:012d}.jpg")
        settings = regions.Settings(images=str(folder.parent), recipe=args.recipe)
        runtime = stage.Runtime(device=args.device, batch_size=args.batch_size, num_workers=args.workers)
        detector = regions.detector_for(settings, runtime)  # kept: the stage reuses it
        items = imgs.list_images(str(folder.parent))

        t0, t_decode = time.perf_counter(), 0.0
        for uri in items:
            t = time.perf_counter()
            bgr, _ = imgs.decode_bgr(storage.read_bytes(uri), uri)
            t_decode += time.perf_counter() - t
            detector.extract([bgr], args.recipe, batch_size=1)
        serial = time.perf_counter() - t0

        spec = regions.plan(str(Path(tmp, "out")), settings)[0]
        t0 = time.perf_counter()
        m = regions.extract(spec, runtime)
        staged = time.perf_counter() - t0
        n = len(items)
        print(f"device {args.device}, {n} images, recipe {args.recipe}, torch threads {torch.get_num_threads()}")
        print(f"serial (baseline): {n / serial:6.3f} img/s  decode {t_decode / serial:5.1%} of wall time, "
              f"model {1 - t_decode / serial:5.1%}")
        print(f"vlprep stage:      {n / staged:6.3f} img/s  model {m['model_seconds'] / staged:5.1%} of wall time "
              f"(decode in {args.workers} workers, overlapped), batch {args.batch_size}")
        print(f"ratio stage/serial: {serial / staged:.2f}x")


if __name__ == "__main__":
    main()
