"""Caption-image pairs for training Maria's matcher, from LXMERT's JSON or from vlprep's caption jsonl.

**LXMERT JSON** (``mscoco_train.json``, ``mscoco_nominival.json``, ``mscoco_minival.json``; Maria's
``xmatching/data.py``): a list of ``{"img_id": "COCO_train2014_000000318556", "sentf": {source: [sentence,
...]}, ...}``. One pair per (image, sentence of ``sentf["mscoco"]``), in file order; the image is
``{image_root}/{train2014|val2014}/{img_id}.jpg`` (upstream: ``{COCO_ROOT}/images/{split}/{img_id}.jpg``,
so ``image_root`` is upstream's ``COCO_ROOT/images``). Images without that source give no pair.

**Caption jsonl** (vlprep ``captions`` stage, VOLTA's format): one ``{"sentences": [...], "id": ...}``
per line. COCO ids are integers (``cocoid``), found as ``COCO_{split}2014_{id:012d}.jpg`` under
``image_root`` (any split folder); Flickr30k lines carry ``img_path`` (a file name under ``image_root``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

from vlprep import VlprepError, storage

LANG_SOURCE = "mscoco"  # Maria trains on --train-langs mscoco


@dataclass(frozen=True)
class Pair:
    uid: str  # upstream's "{img_id}:{source}:{sentence index}"
    image: str  # URI of the image
    sentence: str


def _load_json(uri: str):
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise VlprepError(f"{uri}: no such file; pass LXMERT's mscoco_*.json or a caption jsonl") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlprepError(f"{uri}: not valid JSON ({e})") from None


def read_lxmert(uri: str) -> list[dict]:
    """The entries of an LXMERT caption JSON, each checked for ``img_id`` (str) and ``sentf`` (dict)."""
    doc = _load_json(uri)
    if not isinstance(doc, list):
        raise VlprepError(f"{uri}: an LXMERT caption file is a JSON list of {{img_id, sentf}} objects")
    for i, e in enumerate(doc):
        if not isinstance(e, dict) or not isinstance(e.get("img_id"), str) or not isinstance(e.get("sentf"), dict):
            raise VlprepError(f"{uri}: entry {i} lacks a string 'img_id' or a dict 'sentf'")
    return doc


def coco_image_uri(image_root: str, img_id: str) -> str:
    """``{image_root}/{split}/{img_id}.jpg`` for ``COCO_{split}_{number}`` ids."""
    parts = img_id.split("_")
    if len(parts) != 3 or parts[0] != "COCO":
        raise VlprepError(f"image id {img_id!r} is not a COCO id like COCO_train2014_000000318556")
    return storage.join(image_root, parts[1], img_id + ".jpg")


def lxmert_image_ids(uri: str) -> list[str]:
    """The ``img_id`` of every entry, in file order (Maria's ``create_image_ids.py`` order)."""
    return [e["img_id"] for e in read_lxmert(uri)]


def lxmert_pairs(uris: list[str], image_root: str, source: str = LANG_SOURCE) -> list[Pair]:
    """One pair per sentence of ``sentf[source]``, files in the given order, entries in file order."""
    out = []
    for uri in uris:
        for e in read_lxmert(uri):
            sentences = e["sentf"].get(source, [])
            if not all(isinstance(s, str) for s in sentences):
                raise VlprepError(f"{uri}: {e['img_id']}: sentf[{source!r}] must be a list of strings")
            image = coco_image_uri(image_root, e["img_id"])
            out.extend(Pair(f"{e['img_id']}:{source}:{j}", image, s) for j, s in enumerate(sentences))
    return out


def _coco_number(uri: str) -> int | None:
    stem = PurePosixPath(uri).stem
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if stem.startswith("COCO_") and tail.isdigit() else None


def jsonl_pairs(uri: str, image_root: str) -> list[Pair]:
    """Pairs from a caption jsonl (COCO: integer ids looked up under ``image_root``; Flickr30k: ``img_path``)."""
    try:
        lines = storage.read_text(uri).splitlines()
    except FileNotFoundError:
        raise VlprepError(f"{uri}: no such caption jsonl") from None
    by_number: dict[int, str] | None = None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            sentences, key = obj["sentences"], obj["id"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise VlprepError(f"{uri}: line {n} is not a {{\"sentences\": [...], \"id\": ...}} object ({e})") from None
        if "img_path" in obj:
            image = storage.join(image_root, obj["img_path"])
        else:
            if by_number is None:
                from vlprep.data.images import list_images

                by_number = {k: u for u in list_images(image_root) if (k := _coco_number(u)) is not None}
            if not isinstance(key, int) or key not in by_number:
                raise VlprepError(f"{uri}: line {n}: no COCO image with id {key!r} under {image_root}")
            image = by_number[key]
        out.extend(Pair(f"{key}:jsonl:{j}", image, s) for j, s in enumerate(sentences))
    return out
