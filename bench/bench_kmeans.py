"""Benchmark: X-LXMERT k-means training and cluster assignment, vlprep vs upstream's run_kmeans.py method.

Writes a synthetic grid HDF5 (N images x 8x8 cells x D), then runs each method in its own subprocess
and reports the child's peak RSS (``ru_maxrss`` from ``os.wait4``) and its time (interpreter start and
imports excluded).

Methods:
  imports           loads numpy, h5py, faiss and vlprep and stops: the RSS floor of every child
  train-upstream    BASELINE for training: every cell into one f32 [N*64, D] array (groups in h5py order),
                    then ``faiss.Kmeans(D, K, niter, max_points_per_centroid).train(x)``
  train-vlprep      ``vlprep.kmeans.train_kmeans``: reads only the rows faiss trains on
  assign-upstream   loads the whole target, then ``IndexFlatL2`` + ``search(x, 1)``; the search alone is
                    BASELINE "bare faiss" for assignment throughput
  assign-vlprep     ``vlprep.kmeans.assign_clusters`` over the whole file (reads it block by block)

The training children save their centroids; the run checks they are equal, as are the assignments.

Usage: python bench/bench_kmeans.py [--images 600] [--dim 2048] [--k 100] [--mppc 64] [--niter 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

METHODS = ("imports", "train-upstream", "train-vlprep", "assign-upstream", "assign-vlprep")


def write_synthetic_h5(path: str, n: int, dim: int, seed: int = 0) -> None:
    import h5py

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32) * 3
    with h5py.File(path, "w") as f:
        for i in range(n):
            cells = centres[rng.integers(0, 64, 64)] + rng.standard_normal((64, dim), dtype=np.float32)
            f.create_group(f"COCO_train2014_{i:012d}")["features"] = np.maximum(cells, 0).reshape(8, 8, dim)


def load_all(path: str, dim: int) -> np.ndarray:
    """Upstream's ``load_data``: zeros [N*64, D], each group read into [8, 8, D] and added in."""
    import h5py

    with h5py.File(path, "r") as f:
        keys = list(f.keys())
        data = np.zeros((len(keys) * 64, dim), dtype=np.float32)
        features = np.zeros((8, 8, dim), dtype=np.float32)
        for i, key in enumerate(keys):
            f[f"{key}/features"].read_direct(features)
            data[i * 64 : (i + 1) * 64] += features.reshape(64, dim)
    return data


def worker(method: str, args) -> dict:
    import faiss

    from vlprep import kmeans

    t0 = time.perf_counter()
    out: dict = {}
    if method == "train-upstream":
        km = faiss.Kmeans(args.dim, args.k, niter=args.niter, max_points_per_centroid=args.mppc, verbose=False)
        km.train(load_all(args.h5, args.dim))
        np.save(args.out, km.centroids)
    elif method == "train-vlprep":
        centroids = kmeans.train_kmeans(
            args.h5, k=args.k, niter=args.niter, dim=args.dim, max_points_per_centroid=args.mppc, verbose=False, gpu=False
        )
        np.save(args.out, centroids)
    elif method == "assign-upstream":
        index = faiss.IndexFlatL2(args.dim)
        index.add(np.load(args.centroids))
        x = load_all(args.h5, args.dim)
        t1 = time.perf_counter()
        _, ids = index.search(x, 1)
        out["search_seconds"] = time.perf_counter() - t1
        out["cells"] = len(x)
        np.save(args.out, ids)
    elif method == "assign-vlprep":
        _, ids = kmeans.assign_clusters(args.h5, np.load(args.centroids), gpu=False)
        out["cells"] = ids.size
        np.save(args.out, ids.reshape(-1, 1))
    return {**out, "seconds": time.perf_counter() - t0}


def measure(method: str, args, out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--h5", args.h5, "--out", out, "--centroids", args.centroids]
    cmd += ["--dim", str(args.dim), "--k", str(args.k), "--mppc", str(args.mppc), "--niter", str(args.niter)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{method} worker failed")
    return {**json.loads(stdout), "peak_rss_mb": usage.ru_maxrss / 1024}  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--mppc", type=int, default=64, help="faiss max_points_per_centroid (upstream: 256)")
    parser.add_argument("--niter", type=int, default=10)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--h5", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--centroids", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    work = tempfile.mkdtemp(prefix="bench_kmeans.", dir=args.workdir)
    try:
        args.h5 = os.path.join(work, "grid8.h5")
        write_synthetic_h5(args.h5, args.images, args.dim)
        args.centroids = os.path.join(work, "train-upstream.npy")
        rows = {m: measure(m, args, os.path.join(work, f"{m}.npy")) for m in METHODS}
        same_centroids = np.array_equal(np.load(args.centroids), np.load(os.path.join(work, "train-vlprep.npy")))
        same_ids = np.array_equal(*(np.load(os.path.join(work, f"assign-{m}.npy")) for m in ("upstream", "vlprep")))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cells, floor = args.images * 64, rows["imports"]["peak_rss_mb"]
    print(
        f"k-means: {args.images} images x 64 cells x {args.dim} = {cells * args.dim * 4 / 1e6:.0f} MB of features; "
        f"K={args.k}, max_points_per_centroid={args.mppc} (faiss trains on {min(cells, args.k * args.mppc)} cells), "
        f"{args.niter} iterations; imports alone: {floor:.0f} MB RSS"
    )
    print(f"{'method':<16} {'seconds':>8} {'peak RSS MB':>12} {'above imports':>14} {'RSS ratio':>10} {'net ratio':>10}")
    for method, base in (("train-upstream", "train-upstream"), ("train-vlprep", "train-upstream"),
                         ("assign-upstream", "assign-upstream"), ("assign-vlprep", "assign-upstream")):  # fmt: skip
        r, b = rows[method], rows[base]
        net, base_net = r["peak_rss_mb"] - floor, b["peak_rss_mb"] - floor
        print(
            f"{method:<16} {r['seconds']:>8.2f} {r['peak_rss_mb']:>12.0f} {net:>14.0f} "
            f"{r['peak_rss_mb'] / b['peak_rss_mb']:>10.3f} {net / base_net:>10.3f}"
        )
    bare = rows["assign-upstream"]["search_seconds"]
    ours = rows["assign-vlprep"]["seconds"]
    print(
        f"assignment throughput: bare faiss search on the in-memory array {cells / bare:,.0f} cells/s; vlprep from the "
        f"HDF5 {cells / ours:,.0f} cells/s (ratio {bare / ours:.2f}); upstream load + search "
        f"{cells / rows['assign-upstream']['seconds']:,.0f} cells/s"
    )
    print(f"centroids equal: {same_centroids}; assignments equal: {same_ids}")
    print("ratios: method / baseline (upstream) in this run; 'net' subtracts the imports-only RSS; lower is better")


if __name__ == "__main__":
    main()
