"""Karpathy split files (``dataset_coco.json``, ``dataset_flickr30k.json``).

Layout: ``{"images": [{"split": "train|restval|val|test", "filename": ..., "cocoid": int (COCO),
"sentences": [{"raw": ...}, ...]}, ...]}``. Only those keys are read (as VOLTA's
``extract_captions.py`` does). Any malformed entry raises one error naming the file, the entry
index and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from vlprep import VlprepError, storage
from vlprep.data.ids import DATASETS
from vlprep.data.image_paths import few

SPLITS = ("train", "restval", "val", "test")


@dataclass(frozen=True)
class Entry:
    index: int  # position in the file's "images" list
    split: str
    filename: str
    sentences: tuple[str, ...]
    cocoid: int | None  # COCO only

    @property
    def stem(self) -> str:
        """Upstream's Flickr id: the file name up to the first dot."""
        return self.filename.split(".")[0]


def _bad(uri: str, where: str, what: str) -> VlprepError:
    return VlprepError(f"{uri}: {where}: {what}; fix the entry or use the original Karpathy split file")


def load(uri: str, dataset: str) -> list[Entry]:
    """Read and validate every entry of a Karpathy split file (local path or gs://)."""
    if dataset not in DATASETS:
        raise VlprepError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise VlprepError(f"{uri}: no such file; pass the Karpathy split file (dataset_{dataset}.json)") from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlprepError(f"{uri}: not valid JSON ({e}); re-download the Karpathy split file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise _bad(uri, "top level", "missing key 'images' (a list)")
    out = [_entry(uri, i, e, dataset) for i, e in enumerate(doc["images"])]
    _refuse_repeats(uri, out, dataset)
    return out


def _entry(uri: str, i: int, e, dataset: str) -> Entry:
    where = f"images[{i}]"
    if not isinstance(e, dict):
        raise _bad(uri, where, "is not an object")
    if dataset == "flickr30k" and "cocoid" in e:
        raise VlprepError(f"{uri}: {where} has a 'cocoid': this is a COCO Karpathy file; use dataset coco "
                          "(--dataset coco), or pass dataset_flickr30k.json")
    for key in ("split", "filename", "sentences") + (("cocoid",) if dataset == "coco" else ()):
        if key not in e:
            hint = " (a Flickr30k file? use dataset flickr30k)" if key == "cocoid" else ""
            raise _bad(uri, where, f"missing key {key!r}{hint}")
    if e["split"] not in SPLITS:
        raise _bad(uri, f"{where}.split", f"unknown split {e['split']!r} (expected one of {', '.join(SPLITS)})")
    if not isinstance(e["filename"], str) or not e["filename"]:
        raise _bad(uri, f"{where}.filename", "must be a non-empty string")
    if dataset == "coco" and (not isinstance(e["cocoid"], int) or isinstance(e["cocoid"], bool)):
        raise _bad(uri, f"{where}.cocoid", f"must be an integer (got {e['cocoid']!r})")
    if not isinstance(e["sentences"], list):
        raise _bad(uri, f"{where}.sentences", "must be a list")
    sentences = []
    for j, s in enumerate(e["sentences"]):
        if not isinstance(s, dict) or "raw" not in s:
            raise _bad(uri, f"{where}.sentences[{j}]", "missing key 'raw'")
        if not isinstance(s["raw"], str):
            raise _bad(uri, f"{where}.sentences[{j}].raw", "must be a string")
        sentences.append(s["raw"])
    return Entry(i, e["split"], e["filename"], tuple(sentences), e["cocoid"] if dataset == "coco" else None)


def _refuse_repeats(uri: str, entries: list[Entry], dataset: str) -> None:
    """An image id (COCO cocoid, Flickr30k stem) or a file name given twice would write two rows for one image."""
    first: dict = {}
    repeats = []
    for e in entries:
        keys = [("cocoid", e.cocoid), ("filename", e.filename)] if dataset == "coco" else [("image id", e.stem)]
        for what, key in keys:
            if (what, key) in first:
                repeats.append(f"images[{first[what, key]}] and images[{e.index}] ({what} {key!r})")
                break
        for what, key in keys:
            first.setdefault((what, key), e.index)
    if repeats:
        raise VlprepError(f"{uri}: {len(repeats)} image(s) listed twice: {few(repeats)}; each image must appear once "
                          "(drop the repeated entries, or use the original Karpathy split file)")


def read_ids(uri: str) -> list[int]:
    """An id list file: one integer per line (e.g. VOLTA's ``test1k_ids.txt``)."""
    try:
        lines = storage.read_text(uri).splitlines()
    except FileNotFoundError:
        raise VlprepError(f"{uri}: no such file; pass a file with one image id per line") from None
    ids = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                ids.append(int(line.strip()))
            except ValueError:
                raise VlprepError(f"{uri}: line {n}: {line.strip()!r} is not an integer image id") from None
    return ids
