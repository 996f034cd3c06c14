"""VOLTA region-feature LMDB: streaming writer and a reader with VOLTA's loader semantics.

Layout (VOLTA ``data/mscoco/convert_coco_lmdb.py``, ``data/flickr30k/convert_flickr30k_lmdb.py``):
an LMDB directory; one entry per image, key by ``lmdb_key`` (COCO ``b"9"`` for
``COCO_train2014_000000000009``, Flickr ``str(img_id)``), value = pickle of the TSV row as a dict
of all 13 fields in field order, every value a str; plus ``b"keys"`` = pickled list of the image
keys in insertion order.

Differences from upstream, none visible to a reader:
- Streaming: a write transaction is committed every ``commit_every`` records, so memory stays flat
  (upstream writes everything in one transaction).
- ``writemap`` is off: with it on (upstream COCO) LMDB sizes ``data.mdb`` to the whole 1 TiB map
  (a sparse file, but copy tools and some file systems see 1 TiB). The 1 TiB map is only reserved
  address space here; the file grows with the data.
- The LMDB is built in a hidden sibling directory and renamed into place when complete, so a
  half-built LMDB never exists under the final name.
- Pickles use protocol 4 (VOLTA runs Python 3.6, which reads protocols <= 4; Python >= 3.8 would
  write 5 by default). numpy arrays are pickled under their numpy 1.x names (``numpy.core``), so
  a numpy 1.x reader can load them; numpy >= 2 writes ``numpy._core``, which numpy 1.x lacks.
- Values are unpickled with a restricted unpickler (plain containers, str/bytes, numpy arrays and
  scalars only): a downloaded LMDB cannot run code.
"""

from __future__ import annotations

import binascii
import csv
import io
import os
import struct
from collections.abc import Iterable, Mapping, Sequence

import lmdb
import numpy as np

from vlprep import VlprepError, safe_pickle, storage
from vlprep.data.ids import lmdb_key  # noqa: F401 (re-exported: part of this module's API)
from vlprep.formats.volta_tsv import LXMERT_FIELDS, VOLTA_FIELDS, iter_rows, set_field_size_limit

MAP_SIZE = 1 << 40  # 1 TiB, as upstream; address space only (writemap off)
KEYS_KEY = b"keys"
NUM_LOCS = (4, 5, 7)
GLOBAL_FEATURE = (None, "first", "last")


# --- pickles --------------------------------------------------------------------------------------


def dumps(obj) -> bytes:
    """An LMDB value VOLTA's environment reads (Python 3.6, numpy 1.x): see :mod:`vlprep.safe_pickle`."""
    return safe_pickle.dumps(obj)


def loads(data: bytes, source: str = "LMDB value"):
    """Unpickle containers, str/bytes and numpy arrays or scalars; anything else raises ``VlprepError``."""
    return safe_pickle.loads(data, source)


# --- writer ---------------------------------------------------------------------------------------


class LmdbWriter:
    """Builds an LMDB in a hidden temp directory and publishes it to ``path`` when complete
    (:class:`vlprep.storage.LocalBuild`).

    ``put`` adds one image; a transaction is committed every ``commit_every`` puts. ``close``
    (or leaving the ``with`` block normally) writes ``b"keys"``, syncs and renames; an exception
    removes the temp directory, and a killed process leaves only the hidden one.
    """

    def __init__(self, path, *, commit_every: int = 64, map_size: int = MAP_SIZE, overwrite: bool = False):
        if commit_every < 1:
            raise VlprepError(f"commit_every must be >= 1 (got {commit_every})")
        self._build = storage.LocalBuild(path, directory=True, overwrite=overwrite)
        self.path, self.tmp = str(self._build.target), str(self._build.tmp)
        self.commit_every = commit_every
        self.map_size = map_size
        self.keys: list[bytes] = []
        self._pending = 0
        try:
            self._env = lmdb.open(
                self.tmp, map_size=map_size, subdir=True, writemap=False, sync=False, metasync=False
            )
        except lmdb.Error as e:
            self._build.discard()
            raise VlprepError(
                f"{self.path}: cannot create LMDB ({e}); with little address space lower map_size"
            ) from None
        self._txn = self._env.begin(write=True)

    def put(self, key: bytes, value, what: str = "") -> None:
        """Store ``value`` (pickled by ``dumps``) under ``key``; a repeated key raises."""
        if key == KEYS_KEY:
            raise VlprepError(
                f"{self.path}: image key {key!r}{what} collides with the reserved b'keys' entry"
            )
        try:
            fresh = self._txn.put(key, dumps(value), overwrite=False)
        except lmdb.MapFullError:
            raise VlprepError(
                f"{self.path}: LMDB map full at {self.map_size} bytes; pass a larger map_size"
            ) from None
        if not fresh:
            raise VlprepError(f"{self.path}: duplicate image key {key!r}{what}; each image must appear once")
        self.keys.append(key)
        self._pending += 1
        if self._pending >= self.commit_every:
            self._txn.commit()
            self._txn = self._env.begin(write=True)
            self._pending = 0

    def close(self) -> None:
        """Finish: write ``b"keys"``, sync, rename into place."""
        self._txn.put(KEYS_KEY, dumps(self.keys))
        self._txn.commit()
        self._env.sync(True)
        self._env.close()
        self._build.publish()

    def abort(self) -> None:
        self._txn.abort()
        self._env.close()
        self._build.discard()

    def __enter__(self) -> LmdbWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def build_lmdb(
    rows: Iterable[Mapping[str, str]],
    path,
    dataset: str,
    *,
    commit_every: int = 64,
    map_size: int = MAP_SIZE,
    overwrite: bool = False,
) -> dict:
    """Write a VOLTA LMDB from raw 13-field TSV rows (``volta_tsv.iter_rows``), streaming.

    Memory holds one transaction (``commit_every`` rows, ~70 MB for 64 full rows) plus the key
    list. Returns ``{"path", "records"}``.
    """
    lmdb_key("0", dataset)  # reject an unknown dataset before creating anything
    with LmdbWriter(path, commit_every=commit_every, map_size=map_size, overwrite=overwrite) as writer:
        for row in rows:
            try:
                value = {f: row[f] for f in VOLTA_FIELDS}
            except KeyError as e:
                raise VlprepError(
                    f"image {row.get('img_id')!r}: row lacks field {e}; LMDB values need all 13 fields"
                ) from None
            bad = [f for f, v in value.items() if not isinstance(v, str)]
            if bad:
                raise VlprepError(
                    f"image {row['img_id']!r}: fields {bad} are not str; pass raw TSV rows (iter_rows)"
                )
            writer.put(lmdb_key(row["img_id"], dataset), value, what=f" (img_id {row['img_id']!r})")
    return {"path": writer.path, "records": len(writer.keys)}


def build_lmdb_from_tsv(tsv_paths: Sequence, path, dataset: str, **kwargs) -> dict:
    """``build_lmdb`` over the rows of local TSV files, in order (upstream: train2014 then val2014)."""

    def rows():
        for tsv in tsv_paths:
            with open(tsv, newline="", encoding="utf-8") as f:
                yield from iter_rows(f, VOLTA_FIELDS, name=str(tsv))

    return build_lmdb(rows(), path, dataset, **kwargs)


# --- reader ---------------------------------------------------------------------------------------


def _array(value, columns: int) -> np.ndarray:
    """base64 text (TSV-derived LMDB) or an array (H5-derived LMDB) as float32 [-1, columns]."""
    if isinstance(value, (str, bytes)):
        return np.frombuffer(binascii.a2b_base64(value), dtype="<f4").reshape(-1, columns)
    return np.asarray(value, dtype=np.float32).reshape(-1, columns)


def _check_options(num_locs: int, add_global_imgfeat: str | None) -> None:
    if num_locs not in NUM_LOCS:
        raise VlprepError(f"num_locs must be one of {NUM_LOCS} (got {num_locs})")
    if add_global_imgfeat not in GLOBAL_FEATURE:
        raise VlprepError(f"add_global_imgfeat must be one of {GLOBAL_FEATURE} (got {add_global_imgfeat!r})")


def region_features(
    item: Mapping,
    *,
    feature_size: int = 2048,
    num_locs: int = 5,
    add_global_imgfeat: str | None = None,
    norm_embeddings: bool = False,
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """``(features, num_boxes, spatials, pixel_boxes)`` as VOLTA's ``ImageFeaturesH5Reader`` returns them.

    Uses ``img_h``, ``img_w``, ``features`` and ``boxes`` of ``item`` (str or numpy values).
    Spatial columns (``num_locs``): 4 = x1/W, y1/H, x2/W, y2/H; 5 adds area/(W*H); 7 (UC2) is
    those 4, (x2-x1)/W, (y2-y1)/H, area/(W*H). ``pixel_boxes`` is the same before the division
    (so its area column is still the normalised area, and for 7 columns 4-5 are 0), as upstream.
    ``norm_embeddings`` L2-normalises feature and spatial rows. A global feature (the mean of the
    region features) is prepended (``"first"``) or appended (``"last"``) with spatial row
    ``[0, 0, 1, 1, 1...]``, pixel row ``[0, 0, W, H, W*H...]`` and ``num_boxes + 1``.
    Everything is float32 (upstream's spatial arrays turn float64 once the global row is added;
    the values are the same).
    """
    _check_options(num_locs, add_global_imgfeat)
    img_h, img_w = int(item["img_h"]), int(item["img_w"])
    features = _array(item["features"], feature_size)
    boxes = _array(item["boxes"], 4)

    spatials = np.zeros((len(boxes), num_locs), dtype=np.float32)
    spatials[:, :4] = boxes
    if num_locs >= 5:
        width, height = spatials[:, 2] - spatials[:, 0], spatials[:, 3] - spatials[:, 1]
        spatials[:, -1] = height * width / (float(img_w) * float(img_h))
    pixel_boxes = spatials.copy()
    spatials[:, [0, 2]] /= float(img_w)
    spatials[:, [1, 3]] /= float(img_h)
    if num_locs == 7:
        spatials[:, 4] = spatials[:, 2] - spatials[:, 0]
        spatials[:, 5] = spatials[:, 3] - spatials[:, 1]

    if norm_embeddings:
        features = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
        spatials = spatials / np.linalg.norm(spatials, axis=1, keepdims=True)

    num_boxes = len(features)
    if add_global_imgfeat is not None:
        g_feature = (np.sum(features, axis=0) / num_boxes)[None]
        g_spatial = np.array([[0, 0, 1, 1] + [1] * (num_locs - 4)], dtype=np.float32)
        g_pixel = np.array([[0, 0, img_w, img_h] + [img_w * img_h] * (num_locs - 4)], dtype=np.float32)
        num_boxes += 1
        if add_global_imgfeat == "first":
            features = np.concatenate([g_feature, features])
            spatials = np.concatenate([g_spatial, spatials])
            pixel_boxes = np.concatenate([g_pixel, pixel_boxes])
        else:
            features = np.concatenate([features, g_feature])
            spatials = np.concatenate([spatials, g_spatial])
            pixel_boxes = np.concatenate([pixel_boxes, g_pixel])
    return features, num_boxes, spatials, pixel_boxes


_META = struct.Struct("<I")  # mm_magic, at byte 16 of a meta page
_LMDB_MAGIC = 0xBEEFC0DE


def check_lmdb_file(path: str) -> None:
    """Refuse a ``data.mdb`` shorter than its own meta pages say it is (LMDB would SIGBUS on it).

    Each of the two meta pages (pages 0 and 1) holds, after a 16-byte page header: magic, version,
    address, map size, two 48-byte database records (the first one's leading 4 bytes are the page
    size) and then the last used page number and the transaction id. The newer meta page says how
    many pages the file must hold.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4096 * 2 + 160)
    except OSError as e:
        raise VlprepError(f"{path}: cannot read ({e})") from None
    if len(head) < 160 or _META.unpack_from(head, 16)[0] != _LMDB_MAGIC:
        raise VlprepError(f"{path}: not an LMDB data file (no LMDB magic); rebuild it")
    psize = struct.unpack_from("<I", head, 16 + 24)[0]
    metas = []
    for page in (0, 1):
        off = page * psize
        if len(head) >= off + 160 and _META.unpack_from(head, off + 16)[0] == _LMDB_MAGIC:
            last_pg, txnid = struct.unpack_from("<QQ", head, off + 16 + 24 + 96)
            metas.append((txnid, last_pg))
    if not metas or psize not in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
        raise VlprepError(f"{path}: the LMDB meta pages are corrupt; rebuild the file")
    _, last_pg = max(metas)
    need = (last_pg + 1) * psize
    if size < need:
        raise VlprepError(f"{path}: truncated ({size} bytes, its meta page says {need}); rebuild or re-download it")


class _ReaderBase:
    def __init__(self, *, feature_size=2048, num_locs=5, add_global_imgfeat=None, norm_embeddings=False):
        self.options = {
            "feature_size": feature_size,
            "num_locs": num_locs,
            "add_global_imgfeat": add_global_imgfeat,
            "norm_embeddings": norm_embeddings,
        }
        _check_options(num_locs, add_global_imgfeat)
        self._index: dict[bytes, int] = {}

    def keys(self) -> list[bytes]:
        """Image keys in file order."""
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id) -> bool:
        return str(image_id).encode() in self._index

    def _key(self, image_id) -> bytes:
        key = str(image_id).encode()  # VOLTA looks ids up as str(image_id).encode()
        if key not in self._index:
            raise KeyError(f"image {image_id!r} is not in {self.path}")
        return key

    def __getitem__(self, image_id) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
        """``(features, num_boxes, spatials, pixel_boxes)``; see ``region_features``."""
        self._key(image_id)  # an unknown id is a KeyError, as in VOLTA
        try:
            return region_features(self.item(image_id), **self.options)
        except (KeyError, TypeError, ValueError, binascii.Error, UnicodeError) as e:
            raise VlprepError(
                f"{self.path}: the value of image {image_id!r} is corrupt ({type(e).__name__}: {str(e)[:120]}); "
                "rebuild the file"
            ) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LmdbFeatureReader(_ReaderBase):
    """VOLTA's ``ImageFeaturesH5Reader`` (the not-in-memory branch) over a VOLTA LMDB.

    Opened read-only with ``lock=False, readahead=False, meminit=False`` as upstream. Lookup by
    ``str(image_id).encode()``, through a dict instead of upstream's linear ``list.index``.
    """

    def __init__(self, path, **options):
        super().__init__(**options)
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise VlprepError(f"{self.path}: no LMDB directory there; build it with build_lmdb")
        check_lmdb_file(os.path.join(self.path, "data.mdb"))  # a truncated file would SIGBUS the reader
        try:
            self.env = lmdb.open(
                self.path, max_readers=1, readonly=True, lock=False, readahead=False, meminit=False
            )
            with self.env.begin(write=False) as txn:
                raw = txn.get(KEYS_KEY)
        except lmdb.Error as e:
            raise VlprepError(f"{self.path}: not a readable LMDB ({type(e).__name__}: {e}); rebuild it") from None
        if raw is None:
            self.env.close()
            raise VlprepError(f"{self.path}: LMDB has no b'keys' entry; it is not a VOLTA feature LMDB")
        keys = loads(raw, f"{self.path} b'keys'")
        if not isinstance(keys, list) or not all(isinstance(k, bytes) for k in keys):
            raise VlprepError(f"{self.path}: b'keys' is not a list of bytes; not a VOLTA feature LMDB")
        self._index = {key: i for i, key in enumerate(keys)}

    def item(self, image_id) -> dict:
        """The stored value: a dict of str fields (TSV-derived) or numpy arrays (H5-derived)."""
        key = self._key(image_id)
        try:
            with self.env.begin(write=False) as txn:
                raw = txn.get(key)
        except lmdb.Error as e:
            raise VlprepError(f"{self.path}: cannot read image {image_id!r} ({e}); rebuild the file") from None
        if raw is None:
            raise VlprepError(f"{self.path}: image {image_id!r} is listed in b'keys' but has no value; rebuild it")
        value = loads(raw, f"{self.path} image {image_id!r}")
        if not isinstance(value, dict):
            raise VlprepError(f"{self.path}: the value of image {image_id!r} is not a dict; not a VOLTA LMDB")
        return value

    def close(self) -> None:
        self.env.close()


class TsvFeatureReader(_ReaderBase):
    """Same API as ``LmdbFeatureReader`` over a 13- or 10-field TSV file, keyed by ``lmdb_key``.

    One pass at open records each line's byte offset (memory: one int per image); lookups seek.
    When an img_id repeats, the first line wins.
    """

    def __init__(self, path, dataset: str, **options):
        super().__init__(**options)
        self.path = os.fspath(path)
        set_field_size_limit()
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise VlprepError(f"{self.path}: cannot read the TSV ({e.strerror}); check the path") from None
        offset = 0
        for line in self._file:
            if line.strip():
                img_id = line.split(b"\t", 1)[0]
                try:
                    if img_id.startswith(b'"'):  # a quoted id: let csv unquote it
                        img_id = next(csv.reader(io.StringIO(line.decode()), delimiter="\t"))[0].encode()
                    key = lmdb_key(img_id.decode(), dataset)
                except (UnicodeError, csv.Error, VlprepError) as e:
                    self._file.close()
                    raise VlprepError(
                        f"{self.path}: the line at byte {offset} has no readable image id ({str(e)[:100]}); "
                        "not a VOLTA/LXMERT TSV, or corrupt"
                    ) from None
                self._index.setdefault(key, offset)
            offset += len(line)

    def item(self, image_id) -> dict:
        """The raw row: field -> str."""
        self._file.seek(self._index[self._key(image_id)])
        try:
            line = self._file.readline().decode()
            if '"' in line:
                values = next(csv.reader(io.StringIO(line), delimiter="\t"))
            else:
                values = line.rstrip("\r\n").split("\t")
        except (UnicodeDecodeError, csv.Error) as e:
            raise VlprepError(f"{self.path}: the line of image {image_id!r} is corrupt ({type(e).__name__}); "
                              "re-run the extraction") from None
        if len(values) < len(LXMERT_FIELDS):
            raise VlprepError(
                f"{self.path}: the line of image {image_id!r} has {len(values)} fields; the file is truncated"
            )
        return dict(zip(VOLTA_FIELDS, values, strict=False))

    def close(self) -> None:
        self._file.close()
