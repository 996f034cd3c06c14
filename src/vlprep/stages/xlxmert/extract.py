"""Grid / box features: plan the images, extract one shard into parts, merge the parts into X-LXMERT's HDF5s.

A shard writes, per part folder (the image's split folder, e.g. ``train2014``, or ``all`` for VG / GQA),
one ``PartWriter`` part (``images.jsonl`` + ``<field>.npy``, streamed: memory stays one batch). The merge
streams every folder's parts in shard order into ``{COCO,VG,GQA,nlvr2}/features/maskrcnn_..._{kind}.h5``
(``vlprep.formats.xlxmert_h5``) and writes ``xlxmert_{kind}_report.html`` beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from pathlib import PurePosixPath

from vlprep import VlprepError, stage, storage
from vlprep.data import images as imgs
from vlprep.data.loader import ImageDataset, image_loader
from vlprep.formats import xlxmert_h5
from vlprep.models import weights as wts
from vlprep.progress import Progress
from vlprep.stages.xlxmert.settings import Settings, extraction_stage, features_report

log = logging.getLogger("vlprep.xlxmert")

REPORT_SAMPLES = 4


def plan(out: str, settings: Settings, *, num_shards: int = 1, split: str = "balanced") -> list[dict]:
    """Sorted image list split into shards; the settings recorded for the later steps. Images outside
    the dataset's split folders, and two images that would share one HDF5 group, stop the plan here.
    ``default`` weights are pinned once here (the published URL with its sha256, or random:0 and why)."""
    settings.check()
    items = imgs.list_images(settings.images, settings.image_root)
    seen: dict[tuple[str, str], str] = {}
    for uri in items:
        key = (settings.part_folder(uri), PurePosixPath(uri).stem)
        if key in seen:
            raise VlprepError(f"{seen[key]} and {uri} have the same file stem {key[1]!r}; X-LXMERT keys images by "
                              "stem in one file, so rename or drop one")
        seen[key] = uri
    unfit = "arch tiny: the published weights are for the full X-152" if settings.arch == "tiny" else ""
    weights, fallback = wts.pin_default(settings.weights, "x152", unfit=unfit)
    settings = dataclasses.replace(settings, weights=weights, weights_fallback=fallback or settings.weights_fallback)
    specs = extraction_stage(settings.kind).start(out, settings).plan(items, num_shards=num_shards, split=split)
    return [{**s, "kind": settings.kind} for s in specs]


def detector_for(settings: Settings, runtime: stage.Runtime):
    """The X-152 detector the settings name, on the runtime's device (one kept per process)."""
    device = runtime.resolved_device()

    def load():
        from vlprep.models.detection.x152 import load_x152

        return load_x152(settings.weights, settings.config or None, arch=settings.arch, device=device,
                         autocast_dtype=settings.autocast or None, channels_last=device.startswith("cuda"))

    return stage.cached_model(("x152", settings.weights, settings.config, settings.arch, settings.autocast, device),
                              load)


def _stage_of(spec: dict) -> stage.Stage:
    if "kind" not in spec:
        raise VlprepError(f"shard spec {spec}: no 'kind'; make it with the xlxmert plan step")
    return extraction_stage(spec["kind"])


def extract(spec: dict, runtime: stage.Runtime | None = None) -> dict:
    """Extract one shard (skipped when its marker verifies): parts per folder, then the done-marker."""
    runtime = runtime or stage.Runtime()

    def work(shard, work: stage.Work) -> dict:
        settings = work.settings()
        model = detector_for(settings, runtime)
        t0 = time.time()  # images/s in the report: loading the model is not counted
        found = _extract(shard, model, settings, runtime)
        return {**found, "extract_seconds": round(time.time() - t0, 3), "dim": model.cfg.mlp_dim,
                "random_weights": bool(model.is_random)}

    params = {"device": runtime.device, "batch_size": runtime.batch_size, "num_workers": runtime.num_workers}
    return _stage_of(spec).run_shard(spec, work, params=params)


def _extract(shard, model, settings: Settings, runtime: stage.Runtime) -> dict:
    """Decode (DataLoader workers), extract in batches, stream each image into its folder's part."""
    from vlprep.formats.xlxmert_h5 import Layout, PartWriter

    recipe, layout = settings.recipe(), Layout(settings.kind, model.cfg.mlp_dim)
    failed, notes, images, t_model = [], [], 0, 0.0
    bar = Progress(f"xlxmert {shard.tag}", total=len(shard.items), unit="img")
    loader = image_loader(shard.items, batch_size=max(runtime.batch_size * 4, 1), num_workers=runtime.num_workers,
                          dataset=ImageDataset(shard.items, exif=recipe.exif))
    with contextlib.ExitStack() as stack:
        writers: dict[str, PartWriter] = {}
        for batch in loader:
            for i, err in batch.failed:
                failed.append({"item": shard.items[i], "error": err})
                log.warning("skipped %s: %s", shard.items[i], err)
            tm = time.time()
            results = model.extract(batch.values, recipe, batch_size=runtime.batch_size) if batch.ok else []
            t_model += time.time() - tm
            for (i, note, _), result in zip(batch.ok, results, strict=True):
                uri = shard.items[i]
                note = _short_note(note, result, recipe)
                if note:
                    notes.append({"item": uri, "note": note})
                folder = settings.part_folder(uri)
                if folder not in writers:
                    writers[folder] = stack.enter_context(PartWriter(shard.part(folder), layout.fields))
                writers[folder].add(PurePosixPath(uri).stem, result, image=uri)
                images += 1
            bar.advance(len(batch.ok) + len(batch.failed), failed=len(batch.failed))
    bar.close()
    names = [f"{folder}/{name}" for folder, w in sorted(writers.items()) for name in w.names]
    return {"parts": names, "failed": failed, "notes": notes, "images": images, "model_seconds": round(t_model, 3),
            "folders": {folder: w.count for folder, w in sorted(writers.items())}}


def _short_note(note: str, result: dict, recipe) -> str:
    """The decoder's note, plus for boxes36 fewer than 36 confident boxes (upstream asserts 36; kept here)."""
    short = getattr(recipe, "num_boxes", 0) and result["num_boxes"] < recipe.num_boxes
    extra = f"only {result['num_boxes']} boxes with max_conf > 0 (upstream asserts {recipe.num_boxes})" if short else ""
    return "; ".join(n for n in (note, extra) if n)


def merge(out: str, kind: str = "grid8") -> dict:
    """Every folder's parts, in shard order, into its X-LXMERT HDF5 (streamed); then the report."""
    from vlprep.reports import xlxmert as report

    work = extraction_stage(kind).open(out)
    settings = work.settings()
    done = work.collect()
    dim = next((m["dim"] for _, m in done if m.get("folders")), xlxmert_h5.FEATURE_DIM)  # one model: one width
    layout = xlxmert_h5.Layout(kind, dim)
    summary = _summary(out, settings, done)
    for folder in sorted({f for _, m in done for f in m.get("folders", {})}):
        prefixes = [shard.part(folder) for shard, m in done if folder in m.get("folders", {})]
        merged = xlxmert_h5.merge_parts(prefixes, storage.join(out, settings.feature_file(folder)), layout)
        summary["files"][merged["path"]] = merged["images"]
        summary["names"][settings.target_name(folder)] = merged["path"]
    summary["report"] = storage.join(out, features_report(kind))
    storage.write_text(summary["report"], report.features_html(summary, _samples(done, layout)))
    return summary


def _samples(done, layout: xlxmert_h5.Layout) -> list[tuple[dict, dict]]:
    """The first images, shard by shard (folders in name order), as the parts hold them."""
    parts = (xlxmert_h5.read_part(shard.part(folder), layout.fields)
             for shard, m in done for folder in sorted(m.get("folders", {})))
    return list(itertools.islice(itertools.chain.from_iterable(parts), REPORT_SAMPLES))


def _summary(out: str, settings: Settings, done) -> dict:
    return {"stage": "xlxmert", "kind": settings.kind, "dataset": settings.dataset, "imsize": settings.imsize,
            "weights": settings.weights, "weights_fallback": settings.weights_fallback, "arch": settings.arch, "out": out, "files": {}, "names": {},
            "shards": len(done), "images": sum(m.get("images", 0) for _, m in done),
            "failed": [f for _, m in done for f in m["failed"]],
            "notes": [n for _, m in done for n in m.get("notes", [])],
            "extract_seconds": round(sum(m.get("extract_seconds", 0) for _, m in done), 3),
            "model_seconds": round(sum(m.get("model_seconds", 0) for _, m in done), 3),
            "random_weights": any(m.get("random_weights") for _, m in done)}


def grid_files(out: str) -> dict[str, str]:
    """``{k-means name: grid HDF5 URI}`` of the grid8 extraction planned under ``out`` (from its plan)."""
    work = extraction_stage("grid8").open(out)
    try:
        settings, items = work.settings(), work.plan_doc()["items"]
    except VlprepError:
        raise VlprepError(f"{out}: no grid8 extraction here; extract grid8 features first or give the feature "
                          "files (NAME=path)") from None
    folders = sorted({settings.part_folder(uri) for uri in items})
    return {settings.target_name(f): storage.join(out, settings.feature_file(f)) for f in folders}
