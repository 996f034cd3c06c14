"""VOLTA retrieval ``hard_negative.pkl``: nearest training images by mean region feature.

Structure (VOLTA ``volta/datasets/retrieval_dataset.py``; builder: vilbert-multi-task
``scripts/generate_pool.py``, which VOLTA ships only as a download)::

    {"train_image_list": [int image id, in train-jsonl order],
     "train_hard_pool": int64 array [N, K]}   # K = 100

Row i lists positions in ``train_image_list`` of the K images nearest to image i (euclidean
distance between mean-pooled region features, nearest first); position 0 is i itself, as a
BallTree queried with its own points returns. The loader draws a negative from positions
``1 .. K-1`` (``np.random.randint(1, len(row))``) and applies ``int()``.

Differences from the upstream builder:
- Search is exact brute-force L2 (``vlprep.index.nearest_neighbours``: faiss kNN candidates
  re-ranked by float64 distances with ties broken by position, and i put first even when other
  images have identical features). BallTree's order among exact ties is not specified.
- Upstream stores the pool as float64 (a ``pymp`` shared array); here it is int64.
- With fewer than K training images the pool has N columns (every other image), which the loader
  handles since it samples from ``len(row)``; fewer than 2 images raise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from vlprep import VlprepError, safe_pickle, storage
from vlprep.data.ids import lmdb_key
from vlprep.formats.volta_lmdb import LmdbFeatureReader
from vlprep.formats.volta_tsv import LXMERT_FIELDS, decode_row, iter_rows
from vlprep.index import nearest_neighbours

POOL_SIZE = 100


def build_hard_negatives(
    train_ids: Sequence[int],
    features: Iterable[tuple[int, np.ndarray]],
    *,
    k: int = POOL_SIZE,
    margin: int = 16,
    batch: int = 256,
    skip_missing: bool = False,
) -> dict:
    """``{"train_image_list", "train_hard_pool"}`` for ``train_ids`` (train-jsonl order).

    ``features`` yields ``(image id, mean region feature)``, e.g. from ``mean_features_tsv``, read
    once; ids not in ``train_ids`` are skipped, a repeated training id raises, and a training id
    without features raises (or, with ``skip_missing``, is left out of the list). Memory: one
    float32 [N, D] matrix. ``margin`` extra faiss candidates per query are re-ranked exactly.
    """
    ids = [int(i) for i in train_ids]
    position = {image_id: p for p, image_id in enumerate(ids)}
    if len(position) != len(ids):
        raise VlprepError("train image list has duplicate ids; each training image must appear once")
    if len(ids) < 2:
        raise VlprepError(f"hard negatives need at least 2 training images (got {len(ids)})")
    matrix, filled = _fill(ids, position, features)
    if not filled.all() and not skip_missing:
        missing = [ids[p] for p in np.flatnonzero(~filled)[:10]]
        raise VlprepError(
            f"{len(ids) - int(filled.sum())} training images have no features (first: {missing}); extract them first"
        )
    if not filled.all():
        ids = [i for i, ok in zip(ids, filled, strict=True) if ok]
        matrix = matrix[filled]
        if len(ids) < 2:
            raise VlprepError(f"only {len(ids)} training image(s) have features; need at least 2")
    return {
        "train_image_list": ids,
        "train_hard_pool": nearest_neighbours(matrix, k, margin=margin, batch=batch),
    }


def _fill(ids: list[int], position: dict, features: Iterable[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The [N, D] feature matrix in ``ids`` order and which rows were given."""
    matrix = None
    filled = np.zeros(len(ids), dtype=bool)
    for image_id, feature in features:
        p = position.get(int(image_id))
        if p is None:
            continue
        feature = np.asarray(feature, dtype=np.float32).reshape(-1)
        if matrix is None:
            matrix = np.zeros((len(ids), feature.size), dtype=np.float32)
        if filled[p]:
            raise VlprepError(f"image {image_id} has two feature rows; deduplicate the feature files first")
        if feature.size != matrix.shape[1]:
            raise VlprepError(f"image {image_id}: feature size {feature.size}, others {matrix.shape[1]}")
        matrix[p] = feature
        filled[p] = True
    return (matrix if matrix is not None else np.zeros((len(ids), 0), np.float32)), filled


def write_hard_negatives(path, pool: dict) -> None:
    """Write ``hard_negative.pkl`` atomically (protocol 4, numpy 1.x names: VOLTA's Python 3.6 reads it)."""
    doc = {
        "train_hard_pool": np.asarray(pool["train_hard_pool"], dtype=np.int64),
        "train_image_list": list(pool["train_image_list"]),
    }
    storage.write_bytes(os.fspath(path), safe_pickle.dumps(doc))


def read_hard_negatives(path) -> dict:
    """Load a ``hard_negative.pkl`` (ours or a downloaded one) without running pickled code."""
    return safe_pickle.load_file(path)


def mean_features_tsv(path, dataset: str) -> Iterator[tuple[int, np.ndarray]]:
    """``(image id, mean of the region features)`` per row of a VOLTA or LXMERT TSV, streaming.

    The id is the int of the LMDB key rule (COCO: the number after the last ``_``; Flickr: the id).
    """
    with open(path, newline="", encoding="utf-8") as f:
        for row in iter_rows(f, LXMERT_FIELDS, name=str(path)):  # the first 10 fields of either format
            yield (
                int(lmdb_key(row["img_id"], dataset)),
                mean_feature(decode_row(row, keys=("features",))["features"]),
            )


def mean_features_lmdb(path, feature_size: int = 2048) -> Iterator[tuple[int, np.ndarray]]:
    """``(int(key), mean region feature)`` for every image of a VOLTA LMDB, in key order."""
    with LmdbFeatureReader(path, feature_size=feature_size) as reader:
        for key in reader.keys():
            yield int(key), mean_feature(reader[key.decode()][0])


def mean_feature(features: np.ndarray) -> np.ndarray:
    """The mean region feature as upstream computes it (float32 ``sum(0) / num_boxes``)."""
    return features.sum(axis=0) / len(features)  # float32, as upstream: sum(0) / num_boxes
