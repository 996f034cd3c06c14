"""Plan the images, and extract one shard: detector results as format-neutral parts.

A shard's parts: ``images.jsonl`` (one line per kept image, in item order: its URI and the result's
scalars: ``num_boxes``, ``image_h``, ``image_w``, ...) and one ``{key}.npy`` per per-box array of the
detector result (``boxes``, ``features``, ``cls_prob``, ...), the images' rows concatenated. The merge
renders the formats users read from them (``render.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from vlprep import VlprepError, stage
from vlprep.data import ids
from vlprep.data import images as imgs
from vlprep.data.loader import ImageDataset, image_loader
from vlprep.models import weights as wts
from vlprep.progress import Progress
from vlprep.stages.regions.settings import STAGE, Settings, box_range, lmdb_path, output_split

log = logging.getLogger("vlprep.regions")

IMAGES_PART = "images.jsonl"


def plan(out: str, settings: Settings, *, num_shards: int = 1, split: str = "balanced") -> list[dict]:
    """Sorted image list (a COCO root with split folders, a Flickr30k folder, a list file or a Karpathy
    file) split into shards; the settings are recorded for every later step, ``default`` weights pinned
    once here (the published URL with its sha256, or random:0 and why) so that every shard loads the same."""
    items = imgs.list_images(settings.check().images, settings.image_root)
    check_ids(items, settings)
    unfit = "arch tiny: the published weights are for the full detector" if settings.arch == "tiny" else ""
    weights, fallback = wts.pin_default(settings.weights, "butd", unfit=unfit)
    settings = dataclasses.replace(settings, weights=weights, weights_fallback=fallback or settings.weights_fallback)
    return STAGE.start(out, settings).plan(items, num_shards=num_shards, split=split)


def check_ids(items: list[str], settings: Settings) -> None:
    """Every image gets the ids its outputs need (the TSV's img_id; the LMDB key when an LMDB is built),
    and no two images share one (the merge would keep one of them silently): checked on the whole list
    before any image is decoded; refused naming the first offenders."""
    dataset = settings.dataset
    lmdb = settings.lmdb and "volta-tsv" in settings.wanted_formats
    bad = []
    for uri in items:
        try:
            img_id = ids.volta_id(uri, dataset)
            if lmdb:
                ids.lmdb_key(img_id, dataset)
        except VlprepError:
            bad.append(str(uri))
    if bad:
        fix = "--no-lmdb, or the --dataset they belong to" if lmdb else "the --dataset they belong to"
        rule = ("COCO LMDB keys need names ending in _<number> (COCO_val2014_000000000042.jpg)"
                if dataset == "coco" else "Flickr30k names are numeric (1000092795.jpg)")
        raise VlprepError(f"{len(bad)} of {len(items)} images do not fit the {dataset} id rule: "
                          f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; {rule}; use {fix}")
    ids.refuse_shared_ids(items, lambda u: (output_split(ids.split_of(u), dataset), ids.volta_id(u, dataset)),
                          "a region TSV row is keyed by its output split and the image's file stem")
    if lmdb:
        ids.refuse_shared_ids(
            items, lambda u: (lmdb_path(ids.split_of(u), dataset), ids.lmdb_key(ids.volta_id(u, dataset), dataset)),
            f"the {dataset} LMDB is keyed by the image number")


def detector_for(settings: Settings, runtime: stage.Runtime):
    """The detector the settings name, on the runtime's device (one kept per process)."""
    device = runtime.resolved_device()

    def load():
        from vlprep.models.detection import butd

        cfg = butd.BUTDConfig.tiny() if settings.arch == "tiny" else butd.BUTDConfig()
        return butd.load_detector(settings.weights, config=cfg, device=device, autocast_dtype=settings.autocast or None,
                                  channels_last=device.startswith("cuda"))

    return stage.cached_model(("butd", settings.weights, settings.arch, settings.autocast, device), load)


def extract(spec: dict, runtime: stage.Runtime | None = None) -> dict:
    """Extract one shard (skipped when its marker verifies): parts, then the done-marker."""
    runtime = runtime or stage.Runtime()

    def work(shard, work: stage.Work) -> dict:
        settings = work.settings()
        model = detector_for(settings, runtime)
        t0 = time.time()  # images/s in the report: loading the model is not counted
        found = _detect(shard, model, settings, runtime)
        names = write_results(shard, found["results"])
        return {"parts": names, "failed": found["failed"], "notes": found["notes"],
                "images": len(found["results"]), "extract_seconds": round(time.time() - t0, 3),
                "model_seconds": round(found["model_seconds"], 3), "random_weights": found["random_weights"]}

    params = {"device": runtime.device, "batch_size": runtime.batch_size, "num_workers": runtime.num_workers}
    return STAGE.run_shard(spec, work, params=params)


def _detect(shard, model, settings: Settings, runtime: stage.Runtime) -> dict:
    """``results`` [(uri, detector result)] in item order, ``failed``, ``notes``, model time."""
    recipe = settings.recipe_object()
    lo, _ = box_range(settings)
    results, failed, notes, t_model = [], [], [], 0.0
    prefetch = max(runtime.batch_size * 4, 1)  # room to bucket by size
    images = ImageDataset(shard.items, exif=recipe.exif)
    bar = Progress(f"regions {shard.tag}", total=len(shard.items), unit="img")
    for batch in image_loader(shard.items, batch_size=prefetch, num_workers=runtime.num_workers, dataset=images):
        failed_before = len(failed)
        for i, err in batch.failed:
            failed.append({"item": shard.items[i], "error": err})
            log.warning("skipped %s: %s", shard.items[i], err)
        notes += [{"item": shard.items[i], "note": note} for i, note, _ in batch.ok if note]
        tm = time.time()
        out = model.extract(batch.values, recipe, batch_size=runtime.batch_size) if batch.ok else []
        t_model += time.time() - tm
        for (i, _, _), r in zip(batch.ok, out, strict=True):
            if r["num_boxes"] < lo and recipe.skip_short:
                failed.append({"item": shard.items[i], "error": f"only {r['num_boxes']} boxes (VOLTA skips these)"})
            else:
                results.append((shard.items[i], r))
        bar.advance(len(batch.ok) + len(batch.failed), failed=len(failed) - failed_before)
    bar.close()
    return {"results": results, "failed": failed, "notes": notes, "model_seconds": t_model,
            "random_weights": bool(getattr(model, "is_random", False))}


def _is_per_box(value, n: int) -> bool:
    return isinstance(value, np.ndarray) and value.ndim >= 1 and len(value) == n


def write_results(shard, results: list[tuple[str, dict]]) -> list[str]:
    """``images.jsonl`` + one ``.npy`` per per-box array key (rows of all images, in order)."""
    rows, arrays = [], {}
    for uri, r in results:
        n = r["num_boxes"]
        scalars = {k: v for k, v in r.items() if not _is_per_box(v, n)}
        rows.append({"uri": uri, **{k: v.item() if isinstance(v, np.generic) else v for k, v in scalars.items()}})
        for k, v in r.items():
            if _is_per_box(v, n):
                arrays.setdefault(k, []).append(v)
    shard.write_jsonl(IMAGES_PART, rows)
    for k, chunks in sorted(arrays.items()):
        shard.save_array(f"{k}.npy", np.concatenate(chunks))
    return [IMAGES_PART] + [f"{k}.npy" for k in sorted(arrays)]
