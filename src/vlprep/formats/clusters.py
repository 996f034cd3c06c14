"""X-LXMERT visual-vocabulary files: names, k-means sources/targets, centroids and cluster ids.

Files (X-LXMERT ``feature_extraction/run_kmeans.py``; ``{s}`` = ``_iter{I}_d{D}_grid{G}`` plus
``_imsize{N}`` for resized-image features):
- ``{enc}_{src}_centroids{K}{s}.npy``: f32 [K, D], as ``np.save`` writes it;
- ``{enc}_{src}_{tgt}_cluster_index_centroids{K}{s}.npy``: int64 [N*G*G, 1], cells of the target's images
  in h5py order, row-major within an image;
- ``{enc}_{src}_{tgt}_img_id_to_cluster_id_{K}{s}.pkl``: dict group name (str) -> int64 [G*G].

They go in ``clustering/`` under the datasets folder, where X-LXMERT's pretraining loader and image
sampler read them (``x-lxmert/src/pretrain/lxmert_data.py``, ``lxmert_pretrain.py``,
``x-lxmert/src/tasks/sample_images.py``); the centroids also go in ``cluster_centroids/``, where the
script writes them and the image generator reads them (``image_generator/src/main.py``:
``../datasets/cluster_centroids/``). The .pkl is pickled with protocol 4 and
numpy 1.x names, loadable by X-LXMERT's numpy 1.x environment.

Sources and targets are upstream's names (``TARGETS``) or ``NAME=path`` for any other grid HDF5.
Unlike upstream, a target may equal the source in assign-only runs, an unknown name (such as the
README's ``mscoco valid``) is rejected before any work with the names that exist, and with ``imsize``
the names resolve to the ``_imsize{N}`` feature files (upstream reads the full-size ones whatever
``--imsize`` says, and only names its outputs after it).
"""

from __future__ import annotations

import difflib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlprep import VlprepError, storage
from vlprep.formats.xlxmert_h5 import ENCODER, FEATURE_DIM, PartWriter, feature_file, part_count, read_part
from vlprep.safe_pickle import dumps, loads

CLUSTER_DIR = "clustering"
GENERATOR_DIR = "cluster_centroids"  # the image generator's copy of the centroids
# upstream name -> (dataset, image folder) of its grid HDF5 (feature_file)
TARGETS = {
    "mscoco_train": ("coco", "train2014"),
    "mscoco_valid": ("coco", "val2014"),
    "nlvr_train": ("nlvr2", "train"),
    "nlvr_valid": ("nlvr2", "dev"),
    "vg": ("vg", None),
}
CLUSTER_IDS = "cluster_ids"


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise VlprepError(f"{name!r} cannot be a k-means source/target name; use letters, digits, '_', '.', '-'")
    return name


@dataclass(frozen=True)
class Vocabulary:
    """One k-means run: what upstream's file names encode."""

    src: str = "mscoco_train"
    k: int = 10000
    niter: int = 20
    dim: int = FEATURE_DIM
    grid_size: int = 8
    encoder: str = ENCODER
    imsize: int | None = None

    def __post_init__(self):
        _check_name(self.src)
        if self.imsize is not None and self.imsize < 1:
            raise VlprepError(f"imsize={self.imsize}: give a positive size, or None for full-size images")

    @property
    def _suffix(self) -> str:
        size = f"_imsize{self.imsize}" if self.imsize else ""
        return f"_iter{self.niter}_d{self.dim}_grid{self.grid_size}{size}"

    def centroids_file(self) -> str:
        return f"{CLUSTER_DIR}/{self.encoder}_{self.src}_centroids{self.k}{self._suffix}.npy"

    def generator_centroids_file(self) -> str:
        """The same centroids where X-LXMERT's image generator opens them."""
        return self.centroids_file().replace(f"{CLUSTER_DIR}/", f"{GENERATOR_DIR}/", 1)

    def cluster_index_file(self, tgt: str) -> str:
        return f"{CLUSTER_DIR}/{self.encoder}_{self.src}_{_check_name(tgt)}_cluster_index_centroids{self.k}{self._suffix}.npy"

    def cluster_map_file(self, tgt: str) -> str:
        return f"{CLUSTER_DIR}/{self.encoder}_{self.src}_{_check_name(tgt)}_img_id_to_cluster_id_{self.k}{self._suffix}.pkl"


def resolve_targets(
    specs: Sequence[str], root: str, *, grid_size: int = 8, encoder: str = ENCODER, imsize: int | None = None
) -> dict[str, str]:
    """``{name: grid HDF5 URI}`` for upstream names (under ``root``) and ``NAME=path`` specs, in order."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep:
            if not path:
                raise VlprepError(f"{spec!r}: no path after '='; write NAME=path/to/features_grid8.h5")
        elif name in TARGETS:
            dataset, folder = TARGETS[name]
            path = storage.join(root, feature_file(dataset, folder, kind=f"grid{grid_size}", encoder=encoder, imsize=imsize))
        else:
            close = difflib.get_close_matches(name, TARGETS, n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise VlprepError(
                f"unknown k-means target {name!r}{hint} Use one of {', '.join(TARGETS)}, or NAME=path for another "
                "grid HDF5"
            )
        if _check_name(name) in out:
            raise VlprepError(f"target {name!r} given twice")
        out[name] = path
    return out


def write_centroids(uri: str, centroids: np.ndarray) -> None:
    """Centroids as ``np.save`` writes them, published atomically."""
    with storage.open_write(uri) as f:
        np.save(f, np.ascontiguousarray(centroids, dtype=np.float32))


def read_centroids(uri: str, vocab: Vocabulary | None = None) -> np.ndarray:
    """f32 [K, D] centroids; with ``vocab``, a K or D that differs from it raises."""
    try:
        centroids = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    except FileNotFoundError:
        raise VlprepError(f"{uri}: no centroids; train the vocabulary first (or drop assign-only)") from None
    if centroids.ndim != 2 or (vocab and centroids.shape != (vocab.k, vocab.dim)):
        want = f" (expected [{vocab.k}, {vocab.dim}])" if vocab else ""
        raise VlprepError(f"{uri}: centroids have shape {list(centroids.shape)}{want}")
    return centroids.astype(np.float32, copy=False)


def _fields(grid_size: int) -> dict:
    return {CLUSTER_IDS: ("<i8", (grid_size * grid_size,))}


def write_assignment_part(prefix: str, stems: Sequence[str], ids: np.ndarray, *, grid_size: int = 8) -> list[str]:
    """One shard's cluster ids (int64 [n, G*G], from ``kmeans.assign_clusters``) under ``prefix``; file names."""
    if len(stems) != len(ids):
        raise VlprepError(f"{prefix}: {len(stems)} stems but {len(ids)} rows of cluster ids")
    with PartWriter(prefix, _fields(grid_size)) as part:
        for stem, row in zip(stems, ids, strict=True):
            part.add(stem, {CLUSTER_IDS: row})
    return part.names


def merge_assignments(prefixes: Sequence[str], *, index_uri: str, map_uri: str, grid_size: int = 8) -> dict:
    """Merge assignment parts, in shard order, into the cluster-index .npy and the image -> ids .pkl.

    The .npy streams (its header comes from the parts' headers); the .pkl holds one int64 [G*G] per image
    (memory: that dict, the size of the .pkl). An image in two parts (overlapping shards) raises. Returns
    ``{"images", "cells", "index", "map"}``.
    """
    fields = _fields(grid_size)
    cells = grid_size * grid_size
    total = sum(part_count(p, fields) for p in prefixes)
    mapping: dict[str, np.ndarray] = {}
    with storage.open_write(index_uri) as out:
        np.lib.format.write_array_header_1_0(out, {"descr": "<i8", "fortran_order": False, "shape": (total * cells, 1)})
        for prefix in prefixes:
            for info, record in read_part(prefix, fields):
                stem = info["stem"]
                if stem in mapping:
                    raise VlprepError(f"{prefix}: image {stem!r} is in an earlier part too; shards must not overlap")
                out.write(record[CLUSTER_IDS].tobytes())
                mapping[stem] = record[CLUSTER_IDS].copy()
    storage.write_bytes(map_uri, dumps(mapping))
    return {"images": total, "cells": total * cells, "index": index_uri, "map": map_uri}


def read_cluster_map(uri: str) -> dict[str, np.ndarray]:
    """The image -> cluster ids dict of a .pkl (ours or upstream's), loaded without running pickled code."""
    return loads(storage.read_bytes(uri))
