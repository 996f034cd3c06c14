"""Every device of one machine (``--devices``): the regions extraction, full R-101 C4 BUTD with random
weights (the same compute as the published weights), on a handful of sample images.

Baseline (named ``1 process x 2 threads``): today's direct run, every shard in this process with
torch using the cores. Against it, ``cpu:2``: two worker processes with one thread each. When torch sees
more than one GPU, also every GPU (one worker each) against one GPU in this process. Timed: plan and
the fanned-out extraction, model loading and worker start-up included (what a user waits for); the
merge is the same either way and left out. Prints seconds and images/s of each and the ratio
baseline time / devices time (above 1: the devices run is faster).
Usage: python bench/bench_devices.py [--images 8] [--gpu-images 64] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vlprep import devices, stage
from vlprep.sample import sample_dir
from vlprep.stages import regions


def timed_extract(images: Path, out: Path, *, chosen: devices.Devices | None, device: str, shards: int,
                  batch_size: int) -> float:
    """Seconds for the plan and the fanned-out extraction of ``images`` into ``out``."""
    settings = regions.Settings(images=str(images), weights="random:0", arch="full")
    runtime = stage.Runtime(device=device, batch_size=batch_size, num_workers=0)
    steps = regions.steps(str(out), settings, runtime=runtime, num_shards=shards)[:2]  # plan, extract
    t0 = time.perf_counter()
    with devices.active(chosen):
        stage.run_local("regions", steps)
    return time.perf_counter() - t0


def copies(folder: Path, count: int) -> Path:
    """``count`` sample photos under new names (a COCO-style split folder)."""
    src = sorted(Path(sample_dir(), "images").rglob("*.jpg"))
    split = folder / "val2014"
    split.mkdir(parents=True)
    for i in range(count):
        shutil.copy(src[i % len(src)], split / f"COCO_val2014_{i:012d}.jpg")
    return folder


def compare(name: str, baseline: float, other: float, images: int) -> None:
    print(f"  {name:28s} {other:7.1f} s  {images / other:6.3f} img/s  ratio {baseline / other:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8, help="CPU comparison")
    ap.add_argument("--gpu-images", type=int, default=64, help="GPU comparison (with more than one GPU)")
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        images = copies(Path(tmp, "cpu_images"), args.images)
        torch.set_num_threads(2)
        base = timed_extract(images, Path(tmp, "base"), chosen=None, device="cpu", shards=2,
                             batch_size=args.batch_size)
        two = timed_extract(images, Path(tmp, "cpu2"), chosen=devices.parse("cpu:2", cpu_cores=2), device="cpu",
                            shards=2, batch_size=args.batch_size)
        print(f"CPU, {args.images} images, full BUTD arch (random weights), 2 shards, batch {args.batch_size}")
        print(f"  {'1 process x 2 threads (base)':28s} {base:7.1f} s  {args.images / base:6.3f} img/s")
        compare("cpu:2 (2 processes x 1)", base, two, args.images)
        gpus = torch.cuda.device_count()
        if gpus > 1:
            images = copies(Path(tmp, "gpu_images"), args.gpu_images)
            one = timed_extract(images, Path(tmp, "gpu1"), chosen=None, device="cuda:0", shards=gpus,
                                batch_size=args.batch_size)
            every = timed_extract(images, Path(tmp, "gpus"), chosen=devices.parse("cuda"), device="cuda",
                                  shards=gpus, batch_size=args.batch_size)
            print(f"CUDA, {args.gpu_images} images, {gpus} shards")
            print(f"  {'1 GPU (base)':28s} {one:7.1f} s  {args.gpu_images / one:6.3f} img/s")
            compare(f"{gpus} GPUs", one, every, args.gpu_images)
        else:
            print(f"CUDA: {gpus} GPU(s) visible; the N GPUs vs 1 comparison needs two or more")


if __name__ == "__main__":
    main()
