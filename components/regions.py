"""Region features: plan -> extract (one GPU pod per shard) -> merge -> LMDB -> hard negatives.

See vlprep.stages.regions.
"""

from kfp import dsl
from vlprep_components.config import image


@dsl.component(base_image=image("regions_plan"), install_kfp_package=False)
def regions_plan(images: str, out: str, num_shards: int, image_root: str) -> list:
    from vlprep.stages import regions

    return regions.plan(images, out, int(num_shards), image_root)


@dsl.component(base_image=image("regions_extract"), install_kfp_package=False)
def regions_extract(spec: dict, dataset: str, recipe: str, weights: str, device: str, batch_size: int,
                    num_workers: int, arch: str, recipe_params: dict, autocast: str) -> dict:
    import logging

    from vlprep.stages import regions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    m = regions.extract(spec, dataset, recipe, weights, device, int(batch_size), int(num_workers), arch,
                        recipe_params or None, autocast)
    return {k: m.get(k) for k in ("shard", "items", "images", "skipped", "failed", "extract_seconds")}


@dsl.component(base_image=image("regions_merge"), install_kfp_package=False)
def regions_merge(shards: list, out: str, dataset: str, recipe: str, formats: str, recipe_params: dict,
                  vocab_objects: str, vocab_attributes: str, report: dsl.Output[dsl.HTML],
                  metrics: dsl.Output[dsl.Metrics]) -> dict:
    from vlprep.stages import regions

    summary = regions.merge(out, dataset, recipe, formats, recipe_params or None, vocab_objects, vocab_attributes)
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(summary.pop("report_html"))
    secs = summary["extract_seconds"] or 1e-9
    metrics.log_metric("images", summary["images"])
    metrics.log_metric("failed", len(summary["failed"]))
    metrics.log_metric("images_per_second", round(summary["images"] / secs, 3))
    return {k: summary[k] for k in ("files", "images", "failed", "random_weights")}


@dsl.component(base_image=image("regions_lmdb"), install_kfp_package=False)
def regions_lmdb(merged: dict, out: str, dataset: str, recipe: str) -> dict:
    from vlprep.stages import regions

    return regions.lmdb(out, dataset, recipe)


@dsl.component(base_image=image("regions_hard_negatives"), install_kfp_package=False)
def regions_hard_negatives(merged: dict, out: str, annotations: str, dataset: str) -> dict:
    from vlprep.stages import regions

    return regions.hard_negatives(out, annotations, dataset)
