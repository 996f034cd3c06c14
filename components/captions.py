"""Caption annotations: plan -> extract (one task per shard) -> merge. See vlprep.stages.captions."""

from kfp import dsl
from vlprep_components.config import image


@dsl.component(base_image=image("captions_plan"), install_kfp_package=False)
def captions_plan(karpathy: str, dataset: str, out: str, num_shards: int) -> list:
    from vlprep.stages import captions

    return captions.plan(karpathy, dataset, out, int(num_shards))


@dsl.component(base_image=image("captions_extract"), install_kfp_package=False)
def captions_extract(spec: dict, karpathy: str, dataset: str, test1k_ids: str) -> dict:
    from vlprep.stages import captions

    marker = captions.extract(spec, karpathy, dataset, test1k_ids)
    return {k: marker[k] for k in ("shard", "items", "skipped", "failed")}


@dsl.component(base_image=image("captions_merge"), install_kfp_package=False)
def captions_merge(shards: list, dataset: str, out: str, test1k_ids: str, report: dsl.Output[dsl.Markdown]) -> dict:
    from vlprep import report as rep
    from vlprep.stages import captions

    summary = captions.merge(dataset, out, test1k_ids)
    summary["skipped_shards"] = sum(1 for s in shards if s["skipped"])
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(rep.captions_markdown(summary))
    return summary
