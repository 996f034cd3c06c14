"""HDF5 files of Xmodal-Ctx (XC) and HAAV (HV) cross-modal context, written as upstream writes them.

``vis_ctx.hdf5``
    XC: root attr ``fdim`` (768); one dataset per image, named by the decimal image id (no padding),
    shape (768,) float32, contiguous (no compression).
    HV: root attrs ``fdim_pooled`` (512), ``fdim_grid`` (768); one group per image holding
    ``pooled_features`` (512,) and ``grid_features`` (50, 768), float32, gzip.
``txt_ctx.hdf5``
    one group per image id with subgroups ``whole``, ``five``, ``nine``, each with ``features``
    (float32), ``scores`` (float32) and ``texts`` (variable-length UTF-8 strings; h5py returns bytes).
    XC: whole (16,512)/(16,)/(16,), five (5,16,512)/(5,16)/(5,16), nine (9,16,512)/(9,16)/(9,16);
    no compression, no root attributes.
    HV: root attr ``fdim`` (value dim, 768); whole (128,768), five (5,32,768), nine (9,16,768); all gzip.
``caption_db.hdf5``
    one group per batch, ``"0"``, ``"1"``, ...: ``keys`` (B, d) float32, ``features`` (XC, (B,512)) or
    ``values`` (HV, (B,768)) float32, ``captions`` (B,) variable-length UTF-8; all gzip.

gzip is h5py's ``compression="gzip"`` (level 4, automatic chunks), as upstream. Integer root attributes
are stored as int64 scalars (upstream writes Python ints). Writers append one image (or batch) at a
time to a temp file beside the target and rename it into place on :meth:`close`; on error the temp
file is removed and no target appears.

Image ids are ints (upstream's COCO ids); a string that is not a decimal number (a non-COCO file stem)
names its entry as it is (:func:`entry_name`), and readers return it as a string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from vlprep import VlprepError, storage
from vlprep.data.ids import entry_name, key_order
from vlprep.formats import open_h5

XC = "xmodal-ctx"
HV = "haav"
FLAVORS = (XC, HV)
VIEWS = ("whole", "five", "nine")
N_CROPS = {"whole": None, "five": 5, "nine": 9}
STR = h5py.string_dtype("utf-8")


def _check_flavor(flavor: str) -> str:
    if flavor not in FLAVORS:
        raise VlprepError(f"unknown context layout {flavor!r}; use {XC!r} or {HV!r}")
    return flavor


@dataclass
class Retrieved:
    """Captions retrieved for one view of one image.

    whole: features (k, d), scores (k,), texts k strings; five/nine: (n, k, d), (n, k), n lists of k.
    """

    features: np.ndarray
    scores: np.ndarray
    texts: Sequence


def _key(name: str) -> int | str:
    """An entry name back as an image id: int for decimal names, else the name."""
    return int(name) if name.isascii() and name.isdigit() else name


def _order(name: str) -> tuple:
    """Numeric ids by value first, then other names by code point (``vlprep.data.ids.key_order``)."""
    return key_order(_key(name))


class _H5Writer:
    """An HDF5 file built in a hidden temp file beside ``path`` and published by :meth:`close`."""

    def __init__(self, path: str | Path):
        self._build = storage.LocalBuild(path)
        self.path = self._build.target
        self._f = h5py.File(self._build.tmp, "w")
        self.count = 0

    def _new(self, name: str) -> None:
        if name in self._f:
            raise VlprepError(f"{self.path}: {name!r} was already written; each image (batch) is written once")

    def close(self) -> Path:
        """Finish the file and move it to ``path``."""
        if self._f is None:
            return self.path
        self._f.close()
        self._f = None
        return self._build.publish()

    def abort(self) -> None:
        """Drop the temp file; ``path`` is left as it was."""
        if self._f is not None:
            self._f.close()
            self._f = None
        self._build.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _float32(name: str, value, shape: tuple[int | None, ...]) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape, strict=True)):
        want = "x".join("?" if s is None else str(s) for s in shape)
        raise VlprepError(f"{name}: shape {arr.shape}, expected ({want})")
    return arr


def _texts(name: str, texts, shape: tuple[int, ...]) -> np.ndarray:
    """Strings as an object array of ``shape`` (1-D: a list; 2-D: a list of equal-length lists)."""
    if isinstance(texts, (str, bytes)):
        raise VlprepError(f"{name}: expected a list of strings, got one string")
    rows = list(texts) if len(shape) == 2 else [texts]
    want = shape if len(shape) == 2 else (1,) + shape
    try:
        ok = len(rows) == want[0] and all(len(r) == want[1] and all(isinstance(t, str) for t in r) for r in rows)
    except TypeError:
        ok = False
    if not ok:
        raise VlprepError(f"{name}: expected {'x'.join(map(str, shape))} strings")
    arr = np.empty(want, dtype=object)
    for i, row in enumerate(rows):
        arr[i, :] = list(row)
    return arr.reshape(shape)


class XcVisCtxWriter(_H5Writer):
    """XC ``vis_ctx.hdf5``: ``add(image_id, feature (fdim,))``."""

    def __init__(self, path: str | Path, fdim: int = 768):
        super().__init__(path)
        self.fdim = int(fdim)
        self._f.attrs["fdim"] = np.int64(self.fdim)

    def add(self, image_id: int, feature) -> None:
        name = entry_name(image_id)
        self._new(name)
        self._f.create_dataset(name, data=_float32(f"image {name} feature", feature, (self.fdim,)))
        self.count += 1


class HvVisCtxWriter(_H5Writer):
    """HV ``vis_ctx.hdf5``: ``add(image_id, pooled (fdim_pooled,), grid (tokens, fdim_grid))``."""

    def __init__(self, path: str | Path, fdim_pooled: int = 512, fdim_grid: int = 768):
        super().__init__(path)
        self.fdim_pooled, self.fdim_grid = int(fdim_pooled), int(fdim_grid)
        self._f.attrs["fdim_pooled"] = np.int64(self.fdim_pooled)
        self._f.attrs["fdim_grid"] = np.int64(self.fdim_grid)

    def add(self, image_id: int, pooled, grid) -> None:
        name = entry_name(image_id)
        self._new(name)
        pooled = _float32(f"image {name} pooled", pooled, (self.fdim_pooled,))
        grid = _float32(f"image {name} grid", grid, (None, self.fdim_grid))
        g = self._f.create_group(name)
        g.create_dataset("pooled_features", data=pooled, compression="gzip")
        g.create_dataset("grid_features", data=grid, compression="gzip")
        self.count += 1


class TxtCtxWriter(_H5Writer):
    """``txt_ctx.hdf5`` of either flavor: ``add(image_id, whole, five, nine)`` with :class:`Retrieved` views.

    ``topk`` (whole, five, nine) and ``fdim`` are checked on every image (XC: (16,16,16), 512;
    HV: (128,32,16), 768 for the full-size models).
    """

    def __init__(self, path: str | Path, flavor: str, topk: Sequence[int], fdim: int):
        self.flavor = _check_flavor(flavor)
        super().__init__(path)
        self.topk = dict(zip(VIEWS, (int(k) for k in topk), strict=True))
        self.fdim = int(fdim)
        self._compression = "gzip" if flavor == HV else None
        if flavor == HV:
            self._f.attrs["fdim"] = np.int64(self.fdim)

    def add(self, image_id: int, whole: Retrieved, five: Retrieved, nine: Retrieved) -> None:
        name = entry_name(image_id)
        self._new(name)
        views = {}
        for view, r in zip(VIEWS, (whole, five, nine), strict=True):
            k, n = self.topk[view], N_CROPS[view]
            lead = (k,) if n is None else (n, k)
            where = f"image {name} {view}"
            views[view] = (
                _float32(f"{where} features", r.features, lead + (self.fdim,)),
                _float32(f"{where} scores", r.scores, lead),
                _texts(f"{where} texts", r.texts, lead),
            )
        g = self._f.create_group(name)
        for view, (features, scores, texts) in views.items():
            v = g.create_group(view)
            v.create_dataset("features", data=features, compression=self._compression)
            v.create_dataset("scores", data=scores, compression=self._compression)
            v.create_dataset("texts", data=texts, dtype=STR, compression=self._compression)
        self.count += 1


class CaptionDbWriter(_H5Writer):
    """``caption_db.hdf5``: ``add_batch(keys, values, captions)`` writes group ``str(count)``."""

    def __init__(self, path: str | Path, flavor: str, key_dim: int | None = None, value_dim: int | None = None):
        self.flavor = _check_flavor(flavor)
        super().__init__(path)
        self.values_name = "features" if flavor == XC else "values"
        self.key_dim, self.value_dim = key_dim, value_dim

    def add_batch(self, keys, values, captions: Sequence[str]) -> int:
        """Append one batch; returns its group index."""
        name = str(self.count)
        n = len(captions)
        keys = _float32(f"batch {name} keys", keys, (n, self.key_dim))
        values = _float32(f"batch {name} {self.values_name}", values, (n, self.value_dim))
        g = self._f.create_group(name)
        g.create_dataset("keys", data=keys, compression="gzip")
        g.create_dataset(self.values_name, data=values, compression="gzip")
        g.create_dataset("captions", data=_texts(f"batch {name} captions", captions, (n,)), dtype=STR, compression="gzip")
        self.count += 1
        return self.count - 1


# ---------------------------------------------------------------- readers


def _open(path: str | Path) -> h5py.File:
    return open_h5(path, "context HDF5")


def _ids(f: h5py.File, image_ids: Iterable[int | str] | None) -> list[str]:
    if image_ids is None:
        return sorted(f.keys(), key=_order)
    names = [entry_name(i) for i in image_ids]
    missing = [n for n in names if n not in f]
    if missing:
        raise VlprepError(f"{f.filename}: no entry for image id(s) {', '.join(missing[:5])}")
    return names


def vis_ctx_flavor(path: str | Path) -> str:
    """``xmodal-ctx`` or ``haav``, from the root attributes of a ``vis_ctx.hdf5``."""
    with _open(path) as f:
        if "fdim" in f.attrs:
            return XC
        if "fdim_pooled" in f.attrs:
            return HV
    raise VlprepError(f"{path}: neither XC (attr fdim) nor HV (attr fdim_pooled) vis_ctx layout")


def read_vis_ctx(path: str | Path, image_ids: Iterable[int] | None = None) -> dict[int, np.ndarray | dict[str, np.ndarray]]:
    """XC: image id -> (fdim,) array; HV: image id -> {"pooled": (512,), "grid": (50, 768)}."""
    flavor = vis_ctx_flavor(path)
    with _open(path) as f:
        if flavor == XC:
            return {_key(n): f[n][()] for n in _ids(f, image_ids)}
        return {_key(n): {"pooled": f[n]["pooled_features"][()], "grid": f[n]["grid_features"][()]} for n in _ids(f, image_ids)}


def _decode(arr: np.ndarray):
    return np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(arr).tolist() if arr.size else arr.tolist()


def read_txt_ctx(path: str | Path, image_ids: Iterable[int] | None = None) -> dict[int, dict[str, Retrieved]]:
    """image id -> {"whole"|"five"|"nine": Retrieved} with texts as ``str`` (nested lists for crops)."""
    out: dict[int, dict[str, Retrieved]] = {}
    with _open(path) as f:
        for n in _ids(f, image_ids):
            out[_key(n)] = {
                v: Retrieved(f[n][v]["features"][()], f[n][v]["scores"][()], _decode(f[n][v]["texts"][()]))
                for v in VIEWS
            }
    return out


def read_caption_db(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(keys, values, captions) concatenated over groups "0", "1", ... in index order (as upstream)."""
    keys, values, captions = [], [], []
    with _open(path) as f:
        for i in range(len(f)):
            if str(i) not in f:
                raise VlprepError(f"{path}: batch group {i} is missing (groups must be 0..{len(f) - 1})")
            g = f[str(i)]
            name = "features" if "features" in g else "values"
            keys.append(g["keys"][()])
            values.append(g[name][()])
            captions.extend(b.decode("utf-8") for b in g["captions"][()])
    if not keys:
        raise VlprepError(f"{path}: empty caption DB")
    return np.concatenate(keys), np.concatenate(values), captions
