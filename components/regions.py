"""Region features: plan -> extract (one GPU pod per shard) -> merge -> LMDB -> hard negatives.

See vlprep.stages.regions. The plan takes every setting (recorded for the later steps); the others take
only the shard spec or the output URI, and how they run.
"""

from kfp import dsl
from vlprep_components.config import component


@component
def regions_plan(  # one parameter per setting (vlprep.stages.regions.Settings) + the fan-out
    images: str, image_root: str, dataset: str, recipe: str, recipe_params: dict, weights: str, arch: str,
    autocast: str, formats: str, lmdb: bool, annotations: str, vocab_objects: str, vocab_attributes: str,
    out: str, num_shards: int, split: str,
) -> list:
    from vlprep.stages import regions

    settings = regions.Settings(
        images=images, image_root=image_root, dataset=dataset, recipe=recipe, recipe_params=recipe_params or {},
        weights=weights, arch=arch, autocast=autocast, formats=formats, lmdb=bool(lmdb), annotations=annotations,
        vocab_objects=vocab_objects, vocab_attributes=vocab_attributes)
    return regions.plan(out, settings, num_shards=int(num_shards), split=split)


@component
def regions_extract(spec: dict, device: str, batch_size: int, num_workers: int) -> dict:
    import logging

    from vlprep import stage
    from vlprep.stages import regions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runtime = stage.Runtime(device=device, batch_size=int(batch_size), num_workers=int(num_workers))
    m = regions.extract(spec, runtime)
    return {k: m.get(k) for k in ("shard", "items", "images", "skipped", "failed", "extract_seconds")}


@component
def regions_merge(shards: list, out: str, report: dsl.Output[dsl.HTML], metrics: dsl.Output[dsl.Metrics]) -> dict:
    import shutil

    from vlprep import storage
    from vlprep.stages import regions

    summary = regions.merge(out)
    with storage.open_read(summary["report"]) as src, open(report.path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    secs = summary["extract_seconds"] or 1e-9
    metrics.log_metric("images", summary["images"])
    metrics.log_metric("failed", len(summary["failed"]))
    metrics.log_metric("images_per_second", round(summary["images"] / secs, 3))
    return {k: summary[k] for k in ("files", "images", "failed", "random_weights")}


@component
def regions_lmdb(merged: dict, out: str) -> dict:
    from vlprep.stages import regions

    return regions.lmdb(out)


@component
def regions_hard_negatives(merged: dict, out: str) -> dict:
    from vlprep.stages import regions

    return regions.hard_negatives(out)
