"""X-LXMERT grid / box features and the visual vocabulary. See vlprep.stages.xlxmert.

plan -> extract (one GPU pod per shard) -> merge (HDF5 per split), per kind; for grid8 then
kmeans (GPU) -> assign_plan -> assign (one pod per shard) -> assign_merge. The plan and kmeans take
every setting (recorded for the later steps); the others take the shard spec or the output URI.
"""

from kfp import dsl
from vlprep_components.config import component


@component
def xlxmert_plan(  # one parameter per setting (vlprep.stages.xlxmert.Settings) + the fan-out
    images: str, image_root: str, dataset: str, kind: str, weights: str, config: str, arch: str, autocast: str,
    imsize: int, out: str, num_shards: int, split: str,
) -> list:
    from vlprep.stages import xlxmert

    settings = xlxmert.Settings(images=images, image_root=image_root, dataset=dataset, kind=kind, weights=weights,
                                config=config, arch=arch, autocast=autocast, imsize=int(imsize))
    return xlxmert.plan(out, settings, num_shards=int(num_shards), split=split)


@component
def xlxmert_extract(spec: dict, device: str, batch_size: int, num_workers: int) -> dict:
    import logging

    from vlprep import stage
    from vlprep.stages import xlxmert

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runtime = stage.Runtime(device=device, batch_size=int(batch_size), num_workers=int(num_workers))
    m = xlxmert.extract(spec, runtime)
    return {k: m.get(k) for k in ("shard", "items", "images", "skipped", "failed", "extract_seconds")}


@component
def xlxmert_merge(shards: list, out: str, kind: str, report: dsl.Output[dsl.HTML],
                  metrics: dsl.Output[dsl.Metrics]) -> dict:
    import shutil

    from vlprep import storage
    from vlprep.stages import xlxmert

    summary = xlxmert.merge(out, kind)
    with storage.open_read(summary["report"]) as src, open(report.path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    metrics.log_metric("images", summary["images"])
    metrics.log_metric("failed", len(summary["failed"]))
    metrics.log_metric("images_per_second", round(summary["images"] / (summary["extract_seconds"] or 1e-9), 3))
    return {k: summary[k] for k in ("files", "names", "images", "failed", "random_weights")}


@component
def xlxmert_kmeans(  # one parameter per setting (vlprep.stages.xlxmert.VocabSettings)
    merged: dict, out: str, features: list, src: str, k: int, niter: int, dim: int, seed: int,
    max_points_per_centroid: int, nredo: int, imsize: int, images: str, device: str,
) -> dict:
    import logging

    from vlprep import stage
    from vlprep.stages import xlxmert

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    vocab = xlxmert.VocabSettings(features=tuple(features or ()), src=src, k=int(k), niter=int(niter), dim=int(dim),
                                  seed=int(seed), max_points_per_centroid=int(max_points_per_centroid),
                                  nredo=int(nredo), imsize=int(imsize), images=images)
    record = xlxmert.kmeans(out, vocab, stage.Runtime(device=device))
    return {k: record[k] for k in ("centroids", "vocabulary", "targets", "gpu", "skipped")}


@component
def xlxmert_assign_plan(trained: dict, out: str, num_shards: int, split: str) -> list:
    from vlprep.stages import xlxmert

    return xlxmert.assign_plan(out, num_shards=int(num_shards), split=split)


@component
def xlxmert_assign(spec: dict, device: str) -> dict:
    from vlprep import stage
    from vlprep.stages import xlxmert

    m = xlxmert.assign(spec, stage.Runtime(device=device))
    return {k: m.get(k) for k in ("shard", "items", "skipped", "targets", "gpu")}


@component
def xlxmert_assign_merge(shards: list, out: str, report: dsl.Output[dsl.HTML]) -> dict:
    import shutil

    from vlprep import storage
    from vlprep.stages import xlxmert

    summary = xlxmert.assign_merge(out)
    with storage.open_read(summary["report"]) as src, open(report.path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    summary["skipped_shards"] = sum(1 for s in shards if s["skipped"])
    return summary
