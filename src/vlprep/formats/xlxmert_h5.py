"""X-LXMERT feature HDF5 files (``maskrcnn_*_grid8.h5``, ``maskrcnn_*_boxes36.h5``), their names and shard parts.

Layout (X-LXMERT ``feature_extraction/*_extract_{grid,bbox}_feature.py``): one group per image, named by
the image file stem; datasets are contiguous and uncompressed, as h5py writes ``grp[name] = array``.
- ``grid{G}`` (G = 8): ``features`` f32 [G, G, D], indexed [row y, column x, d].
- ``boxes{B}`` (B = 36): ``features`` f32 [B, D], ``obj_id`` i64 [B] (0-based over 1600 classes),
  ``boxes`` f32 [B, 4] (x1, y1, x2, y2 in original pixels, not normalised), scalar i64 ``img_w``, ``img_h``.
The pretraining loader (``x-lxmert/src/pretrain/lxmert_data.py``) reshapes grid features to [G*G, D]
with box (j/G, i/G, (j+1)/G, (i+1)/G) at index i*G+j (``grid_boxes``), and divides ``boxes`` by
``img_w``/``img_h`` and clamps to [0, 1] itself.

Names (``feature_file``): ``COCO/features/maskrcnn_{train,valid,test}_grid8.h5`` from train2014, val2014,
test2015; ``nlvr2/features/maskrcnn_{train,valid,test}_v4_grid8.h5`` from train, dev, test1 (the name
NLVR2's fine-tuning loader opens; upstream's extractor and k-means leave out ``_v4``);
``VG/features/maskrcnn_grid8.h5`` and ``GQA/features/...`` (one file); optional ``_imsize{N}`` for grids.

Shard parts are format-neutral (``PartWriter``): under a prefix, ``images.jsonl`` (one
``{"stem", "image"}`` per image, in order) and one ``<field>.npy`` per field with a leading image axis.
Both are streamed to temp files while images are added, so memory stays flat. ``merge_parts`` streams
parts in shard order into one HDF5, published atomically; a stem seen twice is an error naming both images.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from vlprep import VlprepError, storage
from vlprep.formats import open_h5

ENCODER = "maskrcnn"
FEATURE_DIM = 2048
DATASET_FOLDERS = {"coco": "COCO", "vg": "VG", "gqa": "GQA", "nlvr2": "nlvr2"}
# image folder -> split name in the file name; datasets absent here have a single file
SPLIT_NAMES = {
    "coco": {"train2014": "train", "val2014": "valid", "test2015": "test"},
    "nlvr2": {"train": "train", "dev": "valid", "test1": "test"},
}
IMAGES = "images.jsonl"
Fields = Mapping[str, tuple[str, tuple[int, ...]]]  # field -> (numpy dtype, per-image shape)


@dataclass(frozen=True)
class Layout:
    """What one image holds: ``grid{G}`` or ``boxes{B}`` features of ``dim`` values."""

    kind: str = "grid8"
    dim: int = FEATURE_DIM

    def __post_init__(self):
        if not re.fullmatch(r"(grid|boxes)[1-9][0-9]*", self.kind):
            raise VlprepError(f"unknown feature kind {self.kind!r}; use grid<N> (e.g. grid8) or boxes<N> (boxes36)")
        if self.dim < 1:
            raise VlprepError(f"feature dim must be positive (got {self.dim})")

    @property
    def grid(self) -> bool:
        return self.kind.startswith("grid")

    @property
    def size(self) -> int:
        return int(self.kind.removeprefix("grid").removeprefix("boxes"))

    @property
    def fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        n, d = self.size, self.dim
        if self.grid:
            return {"features": ("<f4", (n, n, d))}
        return {
            "features": ("<f4", (n, d)),
            "obj_id": ("<i8", (n,)),
            "boxes": ("<f4", (n, 4)),
            "img_w": ("<i8", ()),
            "img_h": ("<i8", ()),
        }


def feature_file(
    dataset: str, split: str | None = None, *, kind: str = "grid8", encoder: str = ENCODER, imsize: int | None = None
) -> str:
    """Relative path X-LXMERT gives the features of ``dataset``'s image folder (or split name) ``split``."""
    Layout(kind)
    if dataset not in DATASET_FOLDERS:
        raise VlprepError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASET_FOLDERS)}")
    splits = SPLIT_NAMES.get(dataset)
    if splits is None:
        if split is not None:
            raise VlprepError(f"{dataset} has one feature file for all images; do not give a split ({split!r})")
        name = f"{encoder}_{kind}"
    elif split in splits or split in splits.values():
        # NLVR2's fine-tuning loader (x-lxmert/src/tasks/nlvr2_data.py) opens its grids as ``_v4_``
        v4 = "_v4" if dataset == "nlvr2" and kind.startswith("grid") else ""
        name = f"{encoder}_{splits.get(split, split)}{v4}_{kind}"
    else:
        raise VlprepError(
            f"{dataset}: unknown split {split!r}; use an image folder ({', '.join(splits)}) or a split "
            f"({', '.join(splits.values())})"
        )
    if imsize is not None:
        if not kind.startswith("grid") or imsize < 1:
            raise VlprepError(f"imsize={imsize}: only grid features have an _imsize<N> variant, N >= 1")
        name += f"_imsize{imsize}"
    return f"{DATASET_FOLDERS[dataset]}/features/{name}.h5"


def grid_boxes(grid_size: int = 8) -> np.ndarray:
    """f32 [G*G, 4]: the normalised box of each grid cell, row-major, as the X-LXMERT loader builds it."""
    i, j = np.divmod(np.arange(grid_size * grid_size), grid_size)
    return (np.stack([j, i, j + 1, i + 1], axis=1) / grid_size).astype(np.float32)


def _check_stem(stem: str) -> str:
    if not isinstance(stem, str) or not stem or "/" in stem or stem in (".", ".."):
        raise VlprepError(f"{stem!r} cannot name an HDF5 group; image stems must be non-empty and without '/'")
    return stem


def check_record(stem: str, record: Mapping, fields: Fields) -> dict[str, np.ndarray]:
    """The record's arrays in the fields' dtypes and shapes; a missing field, wrong shape or dtype raises."""
    out = {}
    for name, (dtype, shape) in fields.items():
        if name not in record:
            raise VlprepError(f"image {stem!r}: no {name!r}; each image needs {', '.join(fields)}")
        value = np.asarray(record[name])
        if value.shape != shape or not np.can_cast(value.dtype, dtype, "same_kind"):
            raise VlprepError(f"image {stem!r}: {name} is {value.dtype}{list(value.shape)}, expected {dtype}{list(shape)}")
        value = np.asarray(value, dtype=dtype, order="C")  # (ascontiguousarray would make scalars 1-d)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise VlprepError(f"image {stem!r}: {name} has NaN or infinite values; k-means and training reject them")
        out[name] = value
    return out


# --- HDF5 -----------------------------------------------------------------------------------------


class H5Writer:
    """Appends one image group at a time to a new HDF5 file at a local ``path``."""

    def __init__(self, path, layout: Layout):
        self.path, self.layout = str(path), layout
        self._file = h5py.File(self.path, "w-")
        self.count = 0

    def __contains__(self, stem: str) -> bool:
        return stem in self._file

    def add(self, stem: str, record: Mapping) -> None:
        if _check_stem(stem) in self._file:
            raise VlprepError(f"{self.path}: image {stem!r} written twice; each image stem must appear once")
        arrays = check_record(stem, record, self.layout.fields)
        group = self._file.create_group(stem)
        for name, value in arrays.items():
            group.create_dataset(name, data=value)
        self.count += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> H5Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def open_h5_writer(uri: str, layout: Layout) -> Iterator[H5Writer]:
    """An ``H5Writer`` whose file is published to ``uri`` (local or gs://) only if the block succeeds."""
    with storage.local_file_for(uri) as local, H5Writer(local, layout) as writer:
        yield writer


class XlxmertH5Reader:
    """Random access to an X-LXMERT feature HDF5 (local path); groups in h5py order (sorted by name)."""

    def __init__(self, path):
        self.path = str(path)
        self._file = open_h5(self.path, "X-LXMERT feature HDF5")
        self._keys = list(self._file.keys())
        self.layout = self._detect() if self._keys else None

    def _detect(self) -> Layout:
        group = self._file[self._keys[0]]
        shape = group["features"].shape if "features" in group else ()
        if "obj_id" in group and len(shape) == 2:
            return Layout(f"boxes{shape[0]}", shape[1])
        if len(shape) == 3 and shape[0] == shape[1]:
            return Layout(f"grid{shape[0]}", shape[2])
        raise VlprepError(f"{self.path}: group {self._keys[0]!r} is neither grid nor boxes features (shape {shape})")

    def keys(self) -> list[str]:
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, stem: str) -> bool:
        return stem in self._file

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __getitem__(self, stem: str) -> dict:
        """``{field: array}`` (``img_w``/``img_h`` as int); a group that does not fit the layout raises."""
        group = self._file[stem]
        out = {}
        for name, (dtype, shape) in self.layout.fields.items():
            if name not in group or group[name].shape != shape:
                raise VlprepError(f"{self.path}: group {stem!r} lacks {name} {dtype}{list(shape)}")
            out[name] = int(group[name][()]) if shape == () else group[name][()]
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> XlxmertH5Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- shard parts ----------------------------------------------------------------------------------


class PartWriter:
    """One shard's images as ``images.jsonl`` + one ``<field>.npy`` per field under ``prefix``.

    Rows stream to local temp files; ``close`` (or leaving the ``with`` block without an error) publishes
    each file atomically (``storage.open_write``) and sets ``names``, the file names for the shard's
    done-marker. Used for features and for cluster ids.
    """

    def __init__(self, prefix: str, fields: Fields):
        self.prefix, self.fields = str(prefix), dict(fields)
        self._dir = Path(tempfile.mkdtemp(prefix="vlprep-part-"))
        self._raw = {name: open(self._dir / name, "wb") for name in self.fields}
        self._images = open(self._dir / IMAGES, "w", encoding="utf-8")
        self.count = 0
        self.names: list[str] | None = None

    def add(self, stem: str, record: Mapping, *, image: str | None = None) -> None:
        for name, value in check_record(_check_stem(stem), record, self.fields).items():
            self._raw[name].write(value.tobytes())
        self._images.write(json.dumps({"stem": stem, "image": image}, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> list[str]:
        if self.names is not None:
            return self.names
        names = []
        try:
            for name, (dtype, shape) in self.fields.items():
                self._raw[name].close()
                with storage.open_write(storage.join(self.prefix, f"{name}.npy")) as out:
                    header = {"descr": dtype, "fortran_order": False, "shape": (self.count, *shape)}
                    np.lib.format.write_array_header_1_0(out, header)
                    with open(self._dir / name, "rb") as raw:
                        shutil.copyfileobj(raw, out, storage.CHUNK)
                names.append(f"{name}.npy")
            self._images.close()
            storage.upload_file(self._dir / IMAGES, storage.join(self.prefix, IMAGES))
            self.names = [*names, IMAGES]
            return self.names
        finally:
            self.abort()

    def abort(self) -> None:
        for f in (*self._raw.values(), self._images):
            f.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self.names is None:
            self.abort()


def _npy_header(f, uri: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Read a .npy header from ``f``; return its image count after checking dtype and per-image shape."""
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got_shape, fortran, got_dtype = read(f)
    except ValueError as e:
        raise VlprepError(f"{uri}: not a .npy file ({e}); rerun the shard that wrote it") from None
    if fortran or got_dtype != np.dtype(dtype) or tuple(got_shape[1:]) != shape or len(got_shape) != len(shape) + 1:
        raise VlprepError(f"{uri}: holds {got_dtype}{list(got_shape)}, expected {dtype}[n, {', '.join(map(str, shape))}]")
    return int(got_shape[0])


def part_count(prefix: str, fields: Fields) -> int:
    """Images in a part, from the header of its first field (reads a few hundred bytes)."""
    name, (dtype, shape) = next(iter(fields.items()))
    uri = storage.join(prefix, f"{name}.npy")
    with storage.open_read(uri) as f:
        return _npy_header(f, uri, dtype, shape)


def read_part(prefix: str, fields: Fields) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
    """Yield ``({"stem", "image"}, {field: array})`` per image of a part, in order, streaming."""
    with contextlib.ExitStack() as stack:
        lines = stack.enter_context(open(stack.enter_context(storage.local_copy(storage.join(prefix, IMAGES))), "rb"))
        images = [json.loads(line) for line in lines]  # stems only: small next to the arrays
        readers = {}
        for name, (dtype, shape) in fields.items():
            uri = storage.join(prefix, f"{name}.npy")
            f = stack.enter_context(open(stack.enter_context(storage.local_copy(uri)), "rb"))
            if _npy_header(f, uri, dtype, shape) != len(images):
                raise VlprepError(f"{uri}: row count differs from {IMAGES} ({len(images)}); rerun the shard")
            readers[name] = (f, np.dtype(dtype), shape, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        for info in images:
            record = {}
            for name, (f, dtype, shape, nbytes) in readers.items():
                record[name] = np.frombuffer(f.read(nbytes), dtype=dtype).reshape(shape)
            yield info, record


def _first_seen(prefixes: Sequence[str], stem: str) -> tuple[str, str]:
    """``(image, part)`` where ``stem`` first appears (re-reads the image lists: only on the error path)."""
    for prefix in prefixes:
        for line in storage.read_text(storage.join(prefix, IMAGES)).splitlines():
            info = json.loads(line)
            if info["stem"] == stem:
                return info.get("image") or stem, prefix
    return stem, "?"


def merge_parts(prefixes: Sequence[str], uri: str, layout: Layout) -> dict:
    """Stream parts, in the order given (shard order), into one HDF5 published atomically at ``uri``.

    Returns ``{"path", "images"}``. A stem seen twice raises, naming both images and their parts.
    """
    with open_h5_writer(uri, layout) as writer:
        for n, prefix in enumerate(prefixes):
            for info, record in read_part(prefix, layout.fields):
                stem = info["stem"]
                if stem in writer:
                    first, where = _first_seen(prefixes[: n + 1], stem)
                    raise VlprepError(
                        f"image stem {stem!r} comes from two files: {first} ({where}) and "
                        f"{info.get('image') or stem} ({prefix}); X-LXMERT keys images by file stem, "
                        "so rename or drop one of them"
                    )
                writer.add(stem, record)
    return {"path": uri, "images": writer.count}
