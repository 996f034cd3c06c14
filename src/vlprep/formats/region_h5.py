"""VOLTA detectron2-path region H5 (``features_extraction/detectron2_proposal_maxnms.py``) and its LMDB.

H5 layout: one group per image, named by the image file stem, holding
``features`` f32 [N,2048], ``obj_id`` i64 [N], ``obj_conf`` f32 [N], ``attr_id`` i64 [N],
``attr_conf`` f32 [N], ``boxes`` f32 [N,4] (x1, y1, x2, y2, original pixels) and scalar
``img_w``, ``img_h`` (N = 36 in that recipe).

``h5_to_lmdb`` follows ``features_extraction/h5_to_lmdb.py``: groups in h5py order (sorted by
name), value = pickle of ``{dataset name: numpy value}`` for the dataset names of the first group
(sorted), then ``img_id`` (the group name, str); key = the group name; plus ``b"keys"``. Unlike
upstream it streams (see ``volta_lmdb.LmdbWriter``), and can apply a dataset key rule instead.

Records (writer input, reader output) use the TSV module's keys: ``img_id, img_h, img_w, obj_ids,
obj_conf, attr_ids, attr_conf, boxes, features``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import h5py
import numpy as np

from vlprep import VlprepError, storage
from vlprep.formats import open_h5
from vlprep.formats.volta_lmdb import MAP_SIZE, LmdbWriter, lmdb_key

# H5 dataset -> (record key, dtype)
H5_ARRAYS = {
    "features": ("features", "<f4"),
    "obj_id": ("obj_ids", "<i8"),
    "obj_conf": ("obj_conf", "<f4"),
    "attr_id": ("attr_ids", "<i8"),
    "attr_conf": ("attr_conf", "<f4"),
    "boxes": ("boxes", "<f4"),
}
H5_SCALARS = ("img_w", "img_h")


class RegionH5Writer:
    """Writes image groups to a hidden temp file beside ``path``; ``close`` publishes it (``storage.LocalBuild``)."""

    def __init__(self, path, overwrite: bool = False):
        self._build = storage.LocalBuild(path, overwrite=overwrite)
        self.path, self.tmp = str(self._build.target), str(self._build.tmp)
        self._file = h5py.File(self.tmp, "x")
        self.count = 0

    def write(self, record: Mapping) -> None:
        name = str(record["img_id"])
        if name in self._file:
            raise VlprepError(f"{self.path}: image {name!r} written twice; each image must appear once")
        features = np.asarray(record["features"])
        n = len(features)
        group = self._file.create_group(name)
        for dataset, (key, dtype) in H5_ARRAYS.items():
            value = np.ascontiguousarray(record[key], dtype=dtype)
            if len(value) != n or (dataset == "boxes" and value.shape != (n, 4)):
                raise VlprepError(f"image {name}: {key} has shape {value.shape}, expected {n} rows")
            group.create_dataset(dataset, data=value)
        for dataset in H5_SCALARS:
            group.create_dataset(dataset, data=np.int64(record[dataset]))
        self.count += 1

    def close(self) -> None:
        self._file.close()
        self._build.publish()

    def abort(self) -> None:
        self._file.close()
        self._build.discard()

    def __enter__(self) -> RegionH5Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_region_h5(path, records: Iterable[Mapping], overwrite: bool = False) -> int:
    """Write records to a region H5 atomically; returns the image count."""
    with RegionH5Writer(path, overwrite=overwrite) as writer:
        for record in records:
            writer.write(record)
    return writer.count


def read_region_h5(path) -> Iterator[dict]:
    """Stream records (TSV-module keys, numpy arrays, int sizes) in h5py group order."""
    with open_h5(path, "region HDF5") as f:
        for name, group in f.items():
            try:
                record = {"img_id": name, **{s: int(group[s][()]) for s in H5_SCALARS}}
                for dataset, (key, _) in H5_ARRAYS.items():
                    record[key] = group[dataset][()]
            except KeyError as e:
                raise VlprepError(
                    f"{path}: group {name!r} lacks dataset {e}; not a region-feature H5"
                ) from None
            yield record


def h5_to_lmdb(
    h5_path,
    lmdb_path,
    *,
    dataset: str | None = None,
    commit_every: int = 64,
    map_size: int = MAP_SIZE,
    overwrite: bool = False,
) -> dict:
    """Convert a region H5 to a VOLTA LMDB as upstream's ``h5_to_lmdb.py`` does, streaming.

    ``dataset=None`` keys entries by group name, as upstream. VOLTA's loaders look COCO images up
    by ``str(cocoid)``, so for a COCO H5 pass ``dataset="coco"`` to key by the COCO rule
    (``b"9"``, see ``volta_lmdb.lmdb_key``); ``img_id`` in the value stays the group name.
    Returns ``{"path", "records"}``.
    """
    if dataset is not None:
        lmdb_key("0", dataset)  # reject an unknown dataset early
    with (
        open_h5(h5_path, "region HDF5") as f,
        LmdbWriter(lmdb_path, commit_every=commit_every, map_size=map_size, overwrite=overwrite) as writer,
    ):
        names = None
        for img_id, group in f.items():
            if names is None:
                names = list(group.keys())
            try:
                item = {k: group[k][()] for k in names}
            except KeyError as e:
                raise VlprepError(
                    f"{h5_path}: group {img_id!r} lacks dataset {e} that the first group has"
                ) from None
            item["img_id"] = img_id
            key = img_id.encode() if dataset is None else lmdb_key(img_id, dataset)
            writer.put(key, item, what=f" (group {img_id!r})")
    return {"path": writer.path, "records": len(writer.keys)}
