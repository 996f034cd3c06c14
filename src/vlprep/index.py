"""faiss in one place: GPU detection, flat and IVF indexes, save/load through the store, search, exact kNN.

- :func:`build` trains and fills an inner-product index over keys: ``flat`` (exact) or upstream
  Xmodal-Ctx's ``IVF{K},Flat`` with ``K = round(8*sqrt(n))`` and ``nprobe = max(1, K // 10)``
  (:func:`ivf_params`); on the GPUs when faiss sees any (the saved index is a CPU index).
- :func:`save` / :func:`load` go through ``vlprep.storage`` (local paths or gs://); ``load`` sets
  nprobe again (also on the GPU copy).
- :func:`search` runs queries in fixed blocks and refuses missing results (faiss's ``-1`` ids).
- :func:`nearest_neighbours`: exact L2 kNN of every row among all rows (hard negatives).
- k-means (X-LXMERT's visual vocabulary) is :mod:`vlprep.kmeans`, beside this module.
"""

from __future__ import annotations

import math

import numpy as np

from vlprep import VlprepError, storage

KINDS = ("ivf", "flat")


def num_gpus() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _gpus(use_gpu: bool | None) -> int:
    return num_gpus() if use_gpu is None or use_gpu else 0


def ivf_params(n: int) -> tuple[int, int]:
    """(K, nprobe) of upstream's index: K = round(8*sqrt(n)) lists, nprobe = max(1, K // 10)."""
    k = int(round(8 * math.sqrt(n)))
    return k, max(1, k // 10)


def build(keys: np.ndarray, kind: str = "ivf", use_gpu: bool | None = None):
    """A trained, filled inner-product faiss index over ``keys`` and its description
    (``factory``, ``nlist``, ``nprobe``, ``n``, ``dim``, ``metric``, ``gpus``)."""
    import faiss

    keys = np.ascontiguousarray(keys, dtype=np.float32)
    n, d = keys.shape
    gpus = _gpus(use_gpu)
    if kind == "flat":
        index, info = faiss.IndexFlatIP(d), {"factory": "Flat", "nlist": None, "nprobe": None}
    elif kind == "ivf":
        k, nprobe = ivf_params(n)
        if n < k:
            raise VlprepError(f"{n} phrases are too few to train IVF{k} (K = round(8*sqrt(n)) needs n >= K); "
                              "use index='flat' (exact search) for a corpus this small")
        index = faiss.index_factory(d, f"IVF{k},Flat", faiss.METRIC_INNER_PRODUCT)
        info = {"factory": f"IVF{k},Flat", "nlist": k, "nprobe": nprobe}
    else:
        raise VlprepError(f"index {kind!r}: use one of {', '.join(KINDS)}")
    if gpus:
        gindex = faiss.index_cpu_to_all_gpus(index)
        gindex.train(keys)
        gindex.add(keys)
        index = faiss.index_gpu_to_cpu(gindex)
    else:
        index.train(keys)
        index.add(keys)
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = info["nprobe"]
    return index, {**info, "n": int(n), "dim": int(d), "metric": "inner_product", "gpus": int(gpus)}


def save(index, uri: str) -> None:
    """Write a (CPU) index to a local path or gs:// URI, atomically."""
    import faiss

    with storage.local_file_for(uri) as path:
        faiss.write_index(index, str(path))


def load(uri: str, nprobe: int | None = None, use_gpu: bool | None = None):
    """A saved index with ``nprobe`` set (IVF), moved to the GPUs when faiss sees any (``use_gpu`` None)."""
    import faiss

    try:
        with storage.local_copy(uri) as path:
            index = faiss.read_index(str(path))
    except FileNotFoundError:
        raise VlprepError(f"{uri}: no index; run the index step first") from None
    if nprobe:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)
    if _gpus(use_gpu):
        index = faiss.index_cpu_to_all_gpus(index)
        if nprobe:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
    return index


def search(index, queries: np.ndarray, k: int, block: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the top ``k`` keys per query, descending; ``block`` > 0 searches that many
    queries at a time (results then do not depend on how many queries come together).

    Refuses missing results (an IVF index whose probed lists hold fewer than ``k`` keys)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    step = int(block) if block and block > 0 else max(1, len(queries))
    found = [index.search(queries[s:s + step], int(k)) for s in range(0, len(queries), step)]
    scores = np.concatenate([f[0] for f in found]) if found else np.zeros((0, k), np.float32)
    ids = np.concatenate([f[1] for f in found]) if found else np.zeros((0, k), np.int64)
    if (ids < 0).any():
        raise VlprepError(f"the index returned fewer than {k} results for some queries (an IVF index with few "
                          "phrases per list); use index='flat' for a small corpus, or a smaller topk")
    return scores, ids


def nearest_neighbours(x: np.ndarray, k: int, *, margin: int = 16, batch: int = 256) -> np.ndarray:
    """int64 [N, min(k, N)]: for each row of ``x``, itself then its nearest rows by L2, nearest first.

    Exact: faiss brute-force kNN (``faiss.knn``, as ``IndexFlatL2.search`` without copying ``x`` into
    an index) gives ``k + margin`` candidates, re-ranked by float64 distance with ties broken by
    position, the query itself first even among exact duplicates.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    k = min(k, n)
    wanted = min(k + margin, n)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, batch):
        queries = x[start : start + batch]
        _, candidates = faiss.knn(queries, x, wanted)
        for row, (q, cand) in enumerate(zip(queries, candidates, strict=True)):
            me = start + row
            cand = np.unique(np.append(cand[cand >= 0], me))
            diff = x[cand].astype(np.float64) - q.astype(np.float64)
            dist = np.einsum("ij,ij->i", diff, diff)
            dist[cand == me] = -1.0  # the query itself first, even among exact duplicates
            order = np.lexsort((cand, dist))  # by distance, then by position
            out[me] = cand[order[:k]]
    return out
