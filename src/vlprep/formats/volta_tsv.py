"""VOLTA (13-field) and LXMERT (10-field) region-feature TSV.

Format (VOLTA ``data/mscoco/extract_coco_image.py``; LXMERT ``src/utils.py`` ``load_obj_tsv``):
tab-separated, no header, one image per line, fields in ``VOLTA_FIELDS`` order. Arrays are base64
of little-endian C-order bytes (ids int64, everything else float32), written as ASCII text.

Lines end in ``"\\r\\n"``: upstream writes with ``csv.DictWriter(f, delimiter="\\t",
fieldnames=...)``, whose dialect (excel) has that line terminator. ``TsvWriter`` goes through the
same csv writer, so a line is byte-identical to what ``DictWriter`` writes for the same values.
Open text streams with ``newline=""`` (as the csv module asks) so nothing translates line ends.

Records (what the writer takes and the decoding reader gives) use these keys::

    img_id, img_h, img_w, obj_ids [N] i64, obj_conf [N] f32, attr_ids [N] i64, attr_conf [N] f32,
    boxes [N,4] f32 (x1, y1, x2, y2, original pixels), features [N,D] f32,
    cls_prob [N,1601] f32, attr_prob [N,401] f32

``cls_prob`` fills both ``cls_prob`` and ``classes`` (upstream writes the same array twice);
``attr_prob`` fills ``attrs``. LXMERT rows need neither.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import io
import itertools
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO

import numpy as np

from vlprep import VlprepError, storage

VOLTA_FIELDS = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
    "num_boxes", "boxes", "features", "cls_prob", "attrs", "classes",
)  # fmt: skip
LXMERT_FIELDS = VOLTA_FIELDS[:10]
LINE_TERMINATOR = "\r\n"  # csv's excel dialect, which upstream's DictWriter uses

# field -> (record key, dtype, row shape after N: () = [N], (4,) = [N, 4], (-1,) = [N, rest])
ARRAY_FIELDS = {
    "objects_id": ("obj_ids", "<i8", ()),
    "objects_conf": ("obj_conf", "<f4", ()),
    "attrs_id": ("attr_ids", "<i8", ()),
    "attrs_conf": ("attr_conf", "<f4", ()),
    "boxes": ("boxes", "<f4", (4,)),
    "features": ("features", "<f4", (-1,)),
    "cls_prob": ("cls_prob", "<f4", (-1,)),
    "attrs": ("attr_prob", "<f4", (-1,)),
    "classes": ("cls_prob", "<f4", (-1,)),
}
_INT_FIELDS = ("img_h", "img_w", "num_boxes")


def set_field_size_limit() -> None:
    """Lift csv's 128 KiB field limit (a features field is ~400 KB), as every upstream script does."""
    csv.field_size_limit(sys.maxsize)


def _check_fields(fields: Sequence[str]) -> tuple[str, ...]:
    fields = tuple(fields)
    if fields not in (VOLTA_FIELDS, LXMERT_FIELDS):
        raise VlprepError(f"unsupported TSV field list {fields}; use VOLTA_FIELDS (13) or LXMERT_FIELDS (10)")
    return fields


def b64encode_array(array, dtype: str) -> str:
    """Base64 text of ``array`` cast to ``dtype`` (little-endian, C order)."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def b64decode_array(text: str | bytes, dtype: str, shape: tuple[int, ...] = (-1,)) -> np.ndarray:
    """Inverse of ``b64encode_array``: a read-only array of ``dtype`` reshaped to ``shape``."""
    flat = np.frombuffer(binascii.a2b_base64(text, strict_mode=True), dtype=dtype)
    return flat.reshape(shape) if flat.size else flat.reshape([0 if s == -1 else s for s in shape])


def encode_record(record: Mapping, fields: Sequence[str] = VOLTA_FIELDS) -> dict[str, str]:
    """The row (field -> str) that upstream's DictWriter would be given for ``record``.

    Arrays are cast to the format's dtypes (e.g. float64 boxes, which numpy >= 2 produces when a
    float32 array is divided by a numpy float64 scale, become float32 again).
    """
    fields = _check_fields(fields)
    features = np.asarray(record["features"])
    if features.ndim != 2:
        raise VlprepError(f"image {record['img_id']}: features must be [N, D], got shape {features.shape}")
    n = features.shape[0]
    row = {
        "img_id": str(record["img_id"]),
        "img_h": str(int(record["img_h"])),
        "img_w": str(int(record["img_w"])),
        "num_boxes": str(n),
    }
    encoded = {}  # record key -> text: cls_prob is encoded once for cls_prob and classes
    for field in fields:
        if field in row:
            continue
        key, dtype, rest = ARRAY_FIELDS[field]
        if key not in encoded:
            array = np.asarray(record[key])
            want = (n, *rest)
            if array.ndim != len(want) or any(
                w not in (-1, a) for w, a in zip(want, array.shape, strict=True)
            ):
                shape = "[" + ", ".join("D" if w == -1 else str(w) for w in want) + "]"
                raise VlprepError(
                    f"image {record['img_id']}: {key} has shape {array.shape}; expected {shape}"
                )
            encoded[key] = b64encode_array(array, dtype)
        row[field] = encoded[key]
    return {field: row[field] for field in fields}


def volta_record(result: Mapping, img_id: str | int) -> dict:
    """The record :class:`TsvWriter` writes for one detector result (``vlprep.models.detection.selection``
    keys): ``img_id``, ``img_h`` / ``img_w`` from ``image_h`` / ``image_w``, and ``cls_prob`` /
    ``attr_prob`` with their last column (background / no-attribute, the model's order) moved FIRST,
    VOLTA's Caffe convention. Other keys are passed through."""
    if "attr_prob" not in result:
        raise VlprepError(
            f"image {img_id}: the detector result has no attributes; VOLTA's 13-field TSV needs a model "
            "with an attribute head (BUTD)"
        )
    cls_prob, attr_prob = np.asarray(result["cls_prob"]), np.asarray(result["attr_prob"])
    return {
        **result,
        "img_id": img_id,
        "img_h": result["image_h"],
        "img_w": result["image_w"],
        "cls_prob": np.concatenate([cls_prob[:, -1:], cls_prob[:, :-1]], axis=1),
        "attr_prob": np.concatenate([attr_prob[:, -1:], attr_prob[:, :-1]], axis=1),
    }


class TsvWriter:
    """Writes records (or already-encoded rows) to a text stream opened with ``newline=""``.

    Output is what ``csv.DictWriter(stream, fieldnames, delimiter="\\t")`` writes. A row whose
    values hold no tab, quote or line break (every row but one with an odd img_id) needs no
    quoting, so it is joined directly (10x faster on ~1 MB rows); others go through csv.
    """

    def __init__(self, stream: IO[str], fields: Sequence[str] = VOLTA_FIELDS):
        self.fields = _check_fields(fields)
        self._stream = stream
        self._csv = csv.writer(stream, delimiter="\t")  # what DictWriter hands each row to
        self.count = 0

    def write(self, record: Mapping) -> None:
        self.write_row(encode_record(record, self.fields))

    def write_row(self, row: Mapping[str, str]) -> None:
        values = [str(row[f]) for f in self.fields]
        if any(c in v for v in values for c in _SPECIAL):
            self._csv.writerow(values)
        else:
            self._stream.write("\t".join(values) + LINE_TERMINATOR)
        self.count += 1


_SPECIAL = ("\t", '"', "\r", "\n")  # characters that make csv quote a field


def iter_rows(
    stream: IO[str], fields: Sequence[str] = VOLTA_FIELDS, name: str = "<stream>"
) -> Iterator[dict[str, str]]:
    """Raw rows (field -> str), as ``csv.DictReader(stream, fieldnames=fields, delimiter="\\t")``.

    A line without a quote character is split on tabs (10x faster than the csv parser on ~1 MB
    lines, same result); one with a quote (only an odd img_id can have one) goes through csv.
    Extra trailing fields are ignored (LXMERT reading a 13-field file does the same); a short row,
    such as the torn last line of an interrupted append, raises naming the row.
    """
    fields = _check_fields(fields)
    set_field_size_limit()
    n, number = len(fields), 0
    try:
        for number, line in enumerate(stream, start=1):
            if '"' in line:  # csv reads on into following lines while a quoted field is open
                values = next(csv.reader(itertools.chain([line], stream), delimiter="\t"))
            else:
                values = line.rstrip("\r\n").split("\t")
            if values == [""]:
                continue  # a blank line: DictReader skips it too
            if len(values) < n:
                raise VlprepError(
                    f"{name}: row {number} has {len(values)} fields, expected {n}; the file is truncated or "
                    "not a region-feature TSV (re-run the extraction for that image)"
                )
            yield dict(zip(fields, values[:n], strict=True))
    except (UnicodeDecodeError, csv.Error) as e:
        raise VlprepError(f"{name}: row {number + 1} is not TSV text ({type(e).__name__}: {str(e)[:100]}); the file is "
                          "corrupt or not a region-feature TSV (re-run the extraction)") from None


def decode_row(row: Mapping[str, str], keys: Iterable[str] | None = None) -> dict:
    """Record (see module doc) from a raw row; ``keys`` limits which arrays are decoded.

    ``img_id`` stays the text in the file; ``img_h``, ``img_w`` and ``num_boxes`` become ints.
    Arrays are read-only views of the decoded bytes (LXMERT's reader makes them read-only too).
    """
    wanted = None if keys is None else set(keys)
    try:
        out = {"img_id": row["img_id"], **{f: int(row[f]) for f in _INT_FIELDS}}
    except ValueError:
        bad = next(f for f in _INT_FIELDS if not row[f].strip().lstrip("-").isdigit())
        raise VlprepError(f"image {row['img_id']}: field {bad} is {row[bad][:40]!r}, not an integer") from None
    n = out["num_boxes"]
    for field, (key, dtype, rest) in ARRAY_FIELDS.items():
        if field == "classes" or field not in row or (wanted is not None and key not in wanted):
            continue
        try:
            out[key] = b64decode_array(row[field], dtype, (n, *rest))
        except (ValueError, binascii.Error) as e:
            raise VlprepError(
                f"image {row['img_id']}: field {field} is not base64 {dtype} data for {n} boxes ({e})"
            ) from None
    return out


def read_tsv(
    path: str | os.PathLike,
    fields: Sequence[str] = VOLTA_FIELDS,
    raw: bool = False,
    keys: Iterable[str] | None = None,
) -> Iterator[dict]:
    """Stream a local TSV file: decoded records, or raw str rows with ``raw=True``. Anything unreadable
    (missing, not UTF-8 text, short rows, bad numbers or base64) is one ``VlprepError`` naming the file."""
    keys = None if keys is None else tuple(keys)
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise VlprepError(f"{path}: cannot read the TSV ({e.strerror}); check the path") from None
    with f:
        for row in iter_rows(f, fields, name=str(path)):
            if raw:
                yield row
                continue
            try:
                record = decode_row(row, keys)
            except VlprepError as e:
                raise VlprepError(f"{path}: {e}") from None
            yield record


@contextlib.contextmanager
def atomic_text(path: str | os.PathLike) -> Iterator[IO[str]]:
    """A text file (``newline=""``) that replaces ``path`` only if the block succeeds."""
    with storage.open_write(os.fspath(path)) as raw:
        f = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        yield f
        f.flush()
        f.detach()  # the binary file stays open for storage to sync and publish


def write_tsv(
    path: str | os.PathLike, records: Iterable[Mapping], fields: Sequence[str] = VOLTA_FIELDS
) -> int:
    """Write records to ``path`` atomically (temp file, then rename); returns the row count."""
    with atomic_text(path) as f:
        writer = TsvWriter(f, fields)
        for record in records:
            writer.write(record)
    return writer.count


def merge_tsv(
    parts: Sequence[str | os.PathLike], out_path: str | os.PathLike, fields: Sequence[str] = VOLTA_FIELDS
) -> dict:
    """Concatenate shard TSVs in the given order, keeping the first row of each img_id.

    Streams row by row (memory: the set of ids seen) and writes ``out_path`` atomically, replacing
    it; upstream's merge instead appends to an existing output without checking its rows. Kept rows
    are copied as their str values, so their bytes are unchanged.
    Returns ``{"rows", "duplicates", "duplicate_ids" (the first 20)}``.
    """
    fields = _check_fields(fields)
    seen: set[str] = set()
    duplicate_ids: list[str] = []
    duplicates = 0
    with atomic_text(out_path) as out:
        writer = TsvWriter(out, fields)
        for part in parts:
            try:
                f = open(part, newline="", encoding="utf-8")
            except FileNotFoundError:
                raise VlprepError(f"{part}: shard TSV missing; rerun the extraction for that shard") from None
            with f:
                for row in iter_rows(f, fields, name=str(part)):
                    if row["img_id"] in seen:
                        duplicates += 1
                        if len(duplicate_ids) < 20:
                            duplicate_ids.append(row["img_id"])
                        continue
                    seen.add(row["img_id"])
                    writer.write_row(row)
    return {"rows": writer.count, "duplicates": duplicates, "duplicate_ids": duplicate_ids}
