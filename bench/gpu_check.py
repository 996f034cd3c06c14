"""Every CUDA path once, with random weights in the real architectures at real input sizes: one table
line per path (name, device, items/s, seconds). Meant for the first GPU machine (``make gpu-check``,
well under 10 minutes on one GPU); ``--device cpu --quick`` runs the same paths with small counts and
tiny architectures, so that a test keeps the script from rotting.

Paths: BUTD R-101-C4 (fp32; fp16 autocast + channels_last), X-152 FPN (grid8, boxes36), CLIP ViT-B/32
image and text towers, Maria's matcher, the faiss index (build + search) and k-means (on the GPU when
faiss has one, ``faiss.get_num_gpus()``; faiss on the CPU otherwise, said in the device column).
Usage: python bench/gpu_check.py [--device cuda|cpu] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

PATHS = ("butd-fp32", "butd-fp16-channels_last", "x152-grid8", "x152-boxes36", "clip-image", "clip-text",
         "matcher", "faiss-index", "faiss-kmeans")
# items per path: (full run on a GPU, --quick)
COUNTS = {"detector": (16, 2), "clip": (512, 4), "matcher": (128, 4), "index": (200_000, 2_000),
          "kmeans": (256_000, 4_000)}


def _timed(name: str, device: str, items: int, work: Callable[[], object]) -> None:
    work_sync = (lambda: (work(), torch.cuda.synchronize())) if device.startswith("cuda") else work
    t0 = time.perf_counter()
    work_sync()
    seconds = time.perf_counter() - t0
    print(f"{name:<26} {device:<10} {items / seconds:>12.2f} items/s {seconds:>9.3f} s", flush=True)


def _images(n: int, quick: bool) -> list[np.ndarray]:
    """COCO-sized BGR photos (640x480 and 480x640), or small ones with --quick."""
    rng = np.random.default_rng(0)
    sizes = [(120, 160), (160, 120)] if quick else [(480, 640), (640, 480)]
    return [rng.integers(0, 256, (*sizes[i % 2], 3), dtype=np.uint8) for i in range(n)]


def check_butd(device: str, quick: bool) -> None:
    from vlprep.models.detection.butd import BUTDConfig, load_detector

    config = BUTDConfig.tiny() if quick else None
    images = _images(COUNTS["detector"][quick], quick)
    model = load_detector("random:0", config=config, device=device)
    _timed("butd-fp32", device, len(images), lambda: model.extract(images, "caffe36", batch_size=4))
    if not device.startswith("cuda"):
        print(f"{'butd-fp16-channels_last':<26} {device:<10} skipped: autocast and channels_last are CUDA-only")
        return
    fast = load_detector("random:0", config=config, device=device, autocast_dtype="fp16", channels_last=True)
    _timed("butd-fp16-channels_last", device, len(images), lambda: fast.extract(images, "caffe36", batch_size=4))


def check_x152(device: str, quick: bool) -> None:
    from vlprep.models.detection.x152 import load_x152

    images = _images(COUNTS["detector"][quick], quick)
    model = load_x152("random:0", arch="tiny" if quick else "full", device=device)
    for recipe in ("grid8", "boxes36"):
        _timed(f"x152-{recipe}", device, len(images), lambda r=recipe: model.extract(images, r, batch_size=2))


def check_clip(device: str, quick: bool) -> None:
    from vlprep.models.clip.encoder import load_model
    from vlprep.stages.context.settings import TINY_CFG

    model, _ = load_model("ViT-B-32", "random:0", TINY_CFG if quick else None)
    model = model.to(device)
    n = COUNTS["clip"][quick]
    pixels = torch.randn(n, 3, 224, 224, device=device)
    tokens = torch.randint(1, 49407, (n, 77), device=device)
    with torch.inference_mode():
        _timed("clip-image", device, n, lambda: [model.encode_image(b) for b in pixels.split(64)])
        _timed("clip-text", device, n, lambda: [model.encode_text(b) for b in tokens.split(256)])


def check_matcher(device: str, quick: bool) -> None:
    from vlprep.models.matching.model import load_matcher

    model = load_matcher("random:0", "tiny" if quick else "maria").to(device)
    n = COUNTS["matcher"][quick]
    ids = torch.randint(1000, 30000, (n, 32), device=device)
    mask = torch.ones_like(ids)
    pixels = torch.randn(n, 3, 224, 224, device=device)
    with torch.inference_mode():
        _timed("matcher", device, n, lambda: [model(i, m, p) for i, m, p in
                                              zip(ids.split(32), mask.split(32), pixels.split(32), strict=True)])


def check_faiss(quick: bool) -> None:
    import faiss

    from vlprep import index, kmeans

    gpu = kmeans.use_gpu()
    where = "cuda" if gpu else "cpu-faiss"
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((COUNTS["index"][quick], 512), dtype=np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    built = {}
    _timed("faiss-index", where, len(keys), lambda: built.update(
        i=index.build(keys, "ivf", use_gpu=gpu)[0]) or index.search(built["i"], keys[:1000], 16))
    x = rng.standard_normal((COUNTS["kmeans"][quick], 2048 if not quick else 64), dtype=np.float32)
    k = 1000 if not quick else 16
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=1234, gpu=gpu)
    _timed("faiss-kmeans", where, len(x), lambda: km.train(x))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small counts and tiny architectures (CPU tests)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the random-weights warnings are expected here
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU; pass --device cpu")
    print(f"{'path':<26} {'device':<10} {'throughput':>20} {'time':>11}  (torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'})")
    t0 = time.perf_counter()
    check_butd(args.device, args.quick)
    check_x152(args.device, args.quick)
    check_clip(args.device, args.quick)
    check_matcher(args.device, args.quick)
    check_faiss(args.quick)
    print(f"all {len(PATHS)} paths in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
