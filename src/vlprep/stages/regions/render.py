"""The merge: detector results from the verified shard parts -> the formats users read, and the report.

Per split (COCO: the image folder; Flickr30k: ``flickr30k``), in shard order:
``resnet101_faster_rcnn_genome_imgfeats/{split}_obj{lo}-{hi}.tsv`` (VOLTA's 13 fields) and
``lxmert/data/mscoco_imgfeat/{split}_obj36.tsv`` (LXMERT's 10) written in one pass (each row encoded
once), and/or ``h5/{split}_obj{lo}-{hi}.h5``; where each consumer opens them: see ``settings.py``.
An image id met twice in one output keeps its first row (as upstream's
merge would have it; counted in the summary). ``report.html`` (boxes and labels drawn on the first
images, counts, throughput, skipped images) goes beside the outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from vlprep import parts, storage
from vlprep.data import ids
from vlprep.stages.regions.extract import IMAGES_PART
from vlprep.stages.regions.settings import (
    REPORT,
    STAGE,
    Settings,
    h5_path,
    lxmert_tsv_path,
    output_split,
    volta_tsv_path,
)

REPORT_SAMPLES = 6


def records(done, mapped: parts.Mapped, dataset: str) -> Iterator[tuple[int, str, str, dict]]:
    """``(shard index, split, uri, record)`` of every extracted image, shard by shard, in item order;
    ``record`` is the detector's format-neutral result with ``img_id``, ``img_h``, ``img_w`` added (the TSV
    takes it through ``volta_tsv.volta_record``). Arrays are memory-mapped part views."""
    for shard, marker in done:
        names = [p["name"] for p in marker["parts"]]
        rows = parts.read_jsonl(shard.part(IMAGES_PART))
        arrays = {n.removesuffix(".npy"): mapped.array(shard.part(n)) for n in names if n.endswith(".npy")}
        offset = 0
        for row in rows:
            uri, n = row["uri"], row["num_boxes"]
            result = {k: v for k, v in row.items() if k != "uri"}
            result.update({k: a[offset:offset + n] for k, a in arrays.items()})
            offset += n
            img_id = ids.volta_id(uri, dataset)
            split = output_split(ids.split_of(uri), dataset)
            yield shard.index, split, uri, {**result, "img_id": img_id, "img_h": result["image_h"],
                                                        "img_w": result["image_w"]}


def _by_split(items: list) -> dict[str, list]:
    """split -> [(uri, record)] in shard and item order (records are views; nothing is copied)."""
    out: dict[str, list] = {}
    for _, split, uri, record in items:
        out.setdefault(split, []).append((uri, record))
    return out


def _first_of_each_id(items: list, dup: dict) -> Iterator[dict]:
    seen: set[str] = set()
    for _, record in items:
        key = str(record["img_id"])
        if key in seen:
            dup["duplicates"] += 1
            continue
        seen.add(key)
        yield record


def _write_tsvs(out: str, split: str, settings: Settings, items: list, dup: dict) -> dict[str, int]:
    """The 13- and/or 10-field TSVs of one split in one pass."""
    from vlprep.formats import volta_tsv

    targets = {"volta-tsv": (volta_tsv_path(split, settings), volta_tsv.VOLTA_FIELDS),
               "lxmert-tsv": (lxmert_tsv_path(split, settings), volta_tsv.LXMERT_FIELDS)}
    chosen = {f: t for f, t in targets.items() if f in settings.wanted_formats}
    if not chosen:
        return {}
    with contextlib.ExitStack() as stack:
        writers = {storage.join(out, path): volta_tsv.TsvWriter(
            stack.enter_context(volta_tsv.atomic_text(storage.join(out, path))), fields)
            for path, fields in chosen.values()}
        for record in _first_of_each_id(items, dup):
            row = volta_tsv.encode_record(volta_tsv.volta_record(record, record["img_id"]))
            for w in writers.values():
                w.write_row(row)
    return {uri: w.count for uri, w in writers.items()}


def _write_h5(out: str, split: str, settings: Settings, items: list, dup: dict) -> dict[str, int]:
    from vlprep.formats import region_h5

    uri = storage.join(out, h5_path(split, settings))
    with storage.local_file_for(uri) as dst:
        return {uri: region_h5.write_region_h5(dst, _first_of_each_id(items, dup), overwrite=True)}


def merge(out: str) -> dict:
    """Merge verified shard parts per split into the settings' formats; writes ``report.html`` too."""
    from vlprep.reports import regions as report

    work = STAGE.open(out)
    settings = work.settings()
    done = work.collect()
    summary = _summary(out, settings, done)
    dup = {"duplicates": 0}
    with parts.Mapped() as mapped:
        every = list(records(done, mapped, settings.dataset))
        for split, items in sorted(_by_split(every).items()):
            summary["files"].update(_write_tsvs(out, split, settings, items, dup))
            if "h5" in settings.wanted_formats:
                summary["files"].update(_write_h5(out, split, settings, items, dup))
        summary["duplicates"] = dup["duplicates"]
        samples = _samples(every, settings.recipe_object().exif)
        html = report.regions_html(summary, samples, settings.vocab_objects, settings.vocab_attributes)
    summary["report"] = storage.join(out, REPORT)
    storage.write_text(summary["report"], html)
    return summary


def _samples(every: list, exif: bool) -> list[dict]:
    """The first images (shard by shard, splits in name order) with what the report draws."""
    first = sorted(every, key=lambda t: (t[0], t[1]))[:REPORT_SAMPLES]  # stable: item order within a split
    return [{"uri": uri, "exif": exif, "img_id": r["img_id"], "num_boxes": r["num_boxes"], "boxes": np.array(r["boxes"]),
             "obj_ids": np.array(r["obj_ids"]), "attr_ids": np.array(r["attr_ids"])} for _, _, uri, r in first]


def _summary(out: str, settings: Settings, done) -> dict:
    return {"stage": STAGE.name, "dataset": settings.dataset, "recipe": settings.recipe, "out": out, "files": {},
            "shards": len(done), "images": sum(m.get("images", 0) for _, m in done),
            "failed": [f for _, m in done for f in m["failed"]],
            "notes": [n for _, m in done for n in m.get("notes", [])],
            "extract_seconds": round(sum(m.get("extract_seconds", 0) for _, m in done), 3),
            "model_seconds": round(sum(m.get("model_seconds", 0) for _, m in done), 3),
            "random_weights": any(m.get("random_weights") for _, m in done),
            "weights": settings.weights, "weights_fallback": settings.weights_fallback}
