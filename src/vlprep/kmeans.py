"""The X-LXMERT visual vocabulary: faiss k-means over grid-cell features, then each cell's nearest centroid.

Upstream (X-LXMERT ``feature_extraction/run_kmeans.py``) loads every grid cell of the source HDF5 (groups
in h5py order, each [G, G, D] reshaped to [G*G, D]) into one f32 [N*G*G, D] array (about 43 GB for COCO
train), runs ``faiss.Kmeans(D, K, niter=I, verbose=True).train(x)`` and assigns every cell of each target
with ``IndexFlatL2(D)`` + ``search(x, 1)`` over the whole target at once.

Same results, less memory:
- Training. When n > K * max_points_per_centroid, faiss's ``Clustering`` trains on the first
  K * max_points_per_centroid entries of ``rand_perm(n, seed)`` (faiss ``subsample_training_set``).
  ``training_rows`` computes that permutation with faiss's own ``rand_perm``; only those rows are read
  (in file order, then placed in faiss's order), and faiss gets exactly K * max_points_per_centroid
  vectors, so it does not subsample again: the same vectors in the same order, the same centroids.
  Peak memory is the training set faiss uses, never the dataset.
- Assignment. faiss's flat search handles queries in blocks of ``distance_compute_blas_query_bs`` rows
  (one BLAS product per block) and picks the BLAS or the direct path from the size of the whole call.
  ``assign_clusters`` searches each block of the target's global row range on its own, in the path the
  whole-target call takes, so every cell gets the same distances and ids as upstream's single call, for
  any shard range (edge blocks read a few images beyond the range).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath

import faiss
import h5py
import numpy as np

from vlprep import VlprepError, storage
from vlprep.formats import open_h5
from vlprep.progress import Progress

K = 10000
NITER = 20
DIM = 2048
SEED = 1234
MAX_POINTS_PER_CENTROID = 256


def use_gpu(gpu: bool | None = None) -> bool:
    """``None``: use the GPU when faiss has one; ``True``: require one."""
    count = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu and not count:
        raise VlprepError("gpu=True but faiss sees no GPU; install faiss-gpu on a GPU machine or pass gpu=False")
    return bool(count) if gpu is None else bool(gpu)


def training_rows(n: int, *, k: int, max_points_per_centroid: int = MAX_POINTS_PER_CENTROID, seed: int = SEED):
    """int64 row numbers faiss's k-means trains on when given ``n`` vectors, in faiss's order."""
    limit = k * max_points_per_centroid
    if n <= limit:
        return np.arange(n, dtype=np.int64)
    if seed < 0 or n > np.iinfo(np.int32).max:
        raise VlprepError(f"seed={seed}, n={n}: faiss subsamples these at random; use seed >= 0 and n < 2**31")
    perm = np.empty(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed)
    return perm[:limit].astype(np.int64)


def feature_shape(f: h5py.File, keys: Sequence[str], name: str) -> tuple[int, ...]:
    """The per-image feature shape (e.g. [8, 8, 2048]) of the first group; raises for an empty file."""
    if not keys:
        raise VlprepError(f"{name}: no image groups; extract grid features first")
    return tuple(f[keys[0]]["features"].shape)


def read_rows(f: h5py.File, keys: Sequence[str], rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """f32 [len(rows), D]: grid cells by global row number (image i, cell c -> i*cells + c), in ``rows`` order.

    Each image with a selected cell is read once, images in file order; memory is the output plus one image.
    """
    cells, dim = math.prod(shape[:-1]), shape[-1]
    out = np.empty((len(rows), dim), dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    images = sorted_rows // cells
    starts = np.flatnonzero(np.diff(images, prepend=-1))
    buf = np.empty(shape, dtype=np.float32)
    for s, e in zip(starts, [*starts[1:], len(rows)], strict=True):
        image = int(images[s])
        dataset = f[keys[image]]["features"]
        if dataset.shape != shape:
            raise VlprepError(f"{f.filename}: group {keys[image]!r} has features {dataset.shape}, others {shape}")
        dataset.read_direct(buf)
        buf += 0  # upstream adds each image into zeros, which turns -0.0 into +0.0
        out[order[s:e]] = buf.reshape(cells, dim)[sorted_rows[s:e] - image * cells]
    return out


# faiss Clustering parameters, one argument each (the issue asks for every one to be settable)
def train_kmeans(
    source: str,
    *,
    k: int = K,
    niter: int = NITER,
    dim: int = DIM,
    seed: int = SEED,
    max_points_per_centroid: int = MAX_POINTS_PER_CENTROID,
    nredo: int = 1,
    gpu: bool | None = None,
    verbose: bool = True,
) -> np.ndarray:
    """f32 [k, dim] centroids of the grid cells of ``source`` (local or gs:// HDF5), as upstream trains them.

    With a GPU, faiss clusters the same vectors on it; that result equals the CPU one up to float rounding.
    """
    with storage.local_copy(source) as path, open_h5(path, "k-means source HDF5", name=source) as f:
        keys = list(f.keys())
        shape = feature_shape(f, keys, source)
        if shape[-1] != dim:
            raise VlprepError(f"{source}: features have {shape[-1]} values, dim={dim}; pass dim={shape[-1]}")
        n = len(keys) * math.prod(shape[:-1])
        if n < k:
            raise VlprepError(f"{source}: {n} grid cells, fewer than k={k} centroids; lower k")
        x = read_rows(f, keys, training_rows(n, k=k, max_points_per_centroid=max_points_per_centroid, seed=seed), shape)
    # min_points_per_centroid only gates faiss's "too few points" warning, which it skips when it subsamples
    min_points = faiss.ClusteringParameters().min_points_per_centroid
    if len(x) < n:
        min_points = min(min_points, max_points_per_centroid)
    kmeans = faiss.Kmeans(
        dim, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid, nredo=nredo,
        min_points_per_centroid=min_points, verbose=verbose, gpu=use_gpu(gpu),
    )
    kmeans.train(x)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def _index(centroids: np.ndarray, gpu: bool):
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    return faiss.index_cpu_to_all_gpus(index) if gpu else index


@contextlib.contextmanager
def _path_of_one_call(rows: int, dim: int) -> Iterator[None]:
    """Make faiss take, for every block, the path (BLAS or direct) it takes for one call over ``rows`` rows.

    faiss since its dimension-aware threshold (2026) takes the direct path when rows * dim <
    ``distance_compute_blas_threshold``; older faiss when rows < 20, which agrees for any target of at
    least one 8x8 image. The direct and BLAS paths round distances differently, so near-ties could flip.
    """
    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = np.iinfo(np.int32).max if rows * dim < saved else 0
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved


def assign_clusters(
    target: str, centroids: np.ndarray, *, start: int = 0, stop: int | None = None, gpu: bool | None = None
) -> tuple[list[str], np.ndarray]:
    """``(stems, ids)`` for images ``[start, stop)`` of ``target`` in h5py order: ids int64 [n, cells].

    Equal to the matching rows of upstream's one search over the whole target, whatever the range.
    """
    gpu = use_gpu(gpu)
    with storage.local_copy(target) as path, open_h5(path, "k-means target HDF5", name=target) as f:
        keys = list(f.keys())
        shape = feature_shape(f, keys, target)
        cells, dim = math.prod(shape[:-1]), shape[-1]
        if dim != centroids.shape[1]:
            raise VlprepError(f"{target}: features have {dim} values, the centroids {centroids.shape[1]}")
        stop = len(keys) if stop is None else min(stop, len(keys))
        if not 0 <= start <= stop:
            raise VlprepError(f"{target}: image range [{start}, {stop}) is not within [0, {len(keys)}]")
        index, total = _index(centroids, gpu), len(keys) * cells
        first, last = start * cells, stop * cells
        ids = np.empty(last - first, dtype=np.int64)
        block = faiss.cvar.distance_compute_blas_query_bs
        bar = Progress(f"kmeans assign {PurePosixPath(target).name} [{start}, {stop})", total=last - first,
                       unit="cells")
        with bar, contextlib.nullcontext() if gpu else _path_of_one_call(total, dim):
            for b0 in range(first - first % block, last, block):
                rows = np.arange(b0, min(b0 + block, total), dtype=np.int64)
                _, found = index.search(read_rows(f, keys, rows, shape), 1)
                lo, hi = max(b0, first), min(b0 + block, last)
                ids[lo - first : hi - first] = found[lo - b0 : hi - b0, 0]
                bar.advance(hi - lo)
        return keys[start:stop], ids.reshape(stop - start, cells)
