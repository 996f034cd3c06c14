"""The merge: ``vis_ctx.hdf5`` and ``txt_ctx.hdf5`` with images sorted by id (values and texts looked up
by row id), and ``context_report.html``.

Parts and values are memory-mapped (gs:// parts copied to local temp files first); each HDF5 file is
written to a local file, then published: give the merge pod disk for the outputs (COCO, XC
``txt_ctx.hdf5`` ~60 GB).
"""

from __future__ import annotations

import json

import numpy as np

from vlprep import VlprepError, parts, storage
from vlprep.data import ids
from vlprep.stages.context.caption_db import read_index_meta
from vlprep.stages.context.phrases import read_phrase_file
from vlprep.stages.context.retrieval import retrieval_fingerprint
from vlprep.stages.context.settings import (
    CAPTION_DB,
    FAISS_INDEX,
    PHRASES,
    REPORT,
    STAGE,
    TXT_CTX,
    VIEWS,
    VIS_CTX,
)

REPORT_SAMPLES = 4
RETRIEVED = [f"{v}_{t}" for v in VIEWS for t in ("ids", "scores")]


def _vis_names(recipe) -> list[str]:
    return ["vis_ctx"] if recipe.vis_ctx == "cls" else ["pooled", "grid"]


def _collect(work, settings):
    """Both fan-outs' verified shards, refusing retrieval shards older than the images or the index."""
    image_done = work.collect("images")
    ret_done = work.collect("retrieve")
    want = retrieval_fingerprint(work.out, settings, image_done)
    if len(ret_done) != len(image_done) or work.plan_doc("retrieve").get("fingerprint") != want:
        raise VlprepError(f"{work.plan_uri('retrieve')}: the retrieval shards are older than the image shards or the "
                          "index; rerun the retrieval plan and retrieval")
    return image_done, ret_done


def _entries(mapped: parts.Mapped, image_done, ret_done, vis_names: list[str]):
    """Every image (sorted by id) as ``(order, shard position, row, meta)``, and each shard's mapped arrays."""
    entries, arrays = [], []
    for (ishard, _), (rshard, _) in zip(image_done, ret_done, strict=True):
        rows = json.loads(storage.read_text(ishard.part("images.json")))
        a = {n: mapped.array(ishard.part(f"{n}.npy")) for n in vis_names}
        a.update({n: mapped.array(rshard.part(f"{n}.npy")) for n in RETRIEVED})
        if any(len(v) != len(rows) for v in a.values()):
            raise VlprepError(f"{rshard.marker}: parts do not match image shard {ishard.index}; rerun retrieval")
        arrays.append(a)
        entries += [(ids.key_order(e["key"]), len(arrays) - 1, r, e) for r, e in enumerate(rows)]
    entries.sort(key=lambda t: t[0])
    return entries, arrays


def _writers(vpath, tpath, recipe, settings, first: dict | None, value_dim: int):
    from vlprep.formats import ctx_h5

    if recipe.vis_ctx == "cls":
        fdim = first["vis_ctx"].shape[1] if first is not None else recipe.dims["vis_ctx"][0]
        vis = ctx_h5.XcVisCtxWriter(vpath, fdim=fdim)
    else:
        fp = first["pooled"].shape[1] if first is not None else recipe.dims["pooled"][0]
        fg = first["grid"].shape[2] if first is not None else recipe.dims["grid"][1]
        vis = ctx_h5.HvVisCtxWriter(vpath, fdim_pooled=fp, fdim_grid=fg)
    return vis, ctx_h5.TxtCtxWriter(tpath, settings.recipe, topk=settings.topk, fdim=value_dim)


def _write(out: str, recipe, settings, entries, arrays, values, texts) -> list[dict]:
    """Both HDF5 files, image by image in id order; returns the report's samples."""
    from vlprep.formats import ctx_h5

    def retrieved(a: dict, r: int, view: str) -> ctx_h5.Retrieved:
        found = np.asarray(a[f"{view}_ids"][r])
        return ctx_h5.Retrieved(values[found.reshape(-1)].reshape(found.shape + (values.shape[1],)),
                                np.asarray(a[f"{view}_scores"][r]),
                                [texts[j] for j in found] if found.ndim == 1 else [[texts[j] for j in row] for row in found])

    samples = []
    with storage.local_file_for(storage.join(out, VIS_CTX)) as vpath, \
            storage.local_file_for(storage.join(out, TXT_CTX)) as tpath:
        vis, txt = _writers(vpath, tpath, recipe, settings, arrays[0] if entries else None, values.shape[1])
        with vis, txt:
            for _, s, r, e in entries:
                a = arrays[s]
                if recipe.vis_ctx == "cls":
                    vis.add(e["key"], a["vis_ctx"][r])
                else:
                    vis.add(e["key"], a["pooled"][r], a["grid"][r])
                views = {v: retrieved(a, r, v) for v in VIEWS}
                txt.add(e["key"], views["whole"], views["five"], views["nine"])
                if len(samples) < REPORT_SAMPLES:
                    samples.append({"key": e["key"], "uri": e["uri"], "size": [e["width"], e["height"]],
                                    "views": {v: {"texts": views[v].texts, "scores": views[v].scores.tolist()}
                                              for v in VIEWS}})
    return samples


def merge(out: str) -> dict:
    """``vis_ctx.hdf5`` and ``txt_ctx.hdf5`` (images sorted by id) from the verified shards, and the report."""
    from vlprep.models.clip import get_recipe
    from vlprep.reports.context import context_html

    work = STAGE.open(out)
    settings = work.settings()
    recipe = get_recipe(settings.recipe)
    image_done, ret_done = _collect(work, settings)
    meta = read_index_meta(out)
    texts = read_phrase_file(storage.join(out, PHRASES))
    with parts.Mapped() as mapped:
        values = mapped.array(storage.join(out, meta["values"]))
        entries, arrays = _entries(mapped, image_done, ret_done, _vis_names(recipe))
        samples = _write(out, recipe, settings, entries, arrays, values, texts)
    summary = {
        "stage": STAGE.name,
        "out": out,
        "recipe": settings.recipe,
        "images": len(entries),
        "failed": [f for _, m in image_done for f in m["failed"]],
        "phrases": len(texts),
        "index": meta["factory"],
        **({"nprobe": meta["nprobe"]} if meta.get("nprobe") else {}),
        "topk": list(settings.topk),
        "random_weights": any(m.get("random_weights") for _, m in image_done),
        "weights": next((m["weights"] for _, m in image_done if m.get("weights")), {}),
        "weights_fallback": settings.weights_fallback,
        "shards": {"images": len(image_done), "retrieval": len(ret_done)},
        "files": {rel: storage.join(out, rel) for rel in (VIS_CTX, TXT_CTX, CAPTION_DB, FAISS_INDEX, PHRASES, REPORT)},
    }
    storage.write_text(storage.join(out, REPORT), context_html(summary, samples))
    return summary
