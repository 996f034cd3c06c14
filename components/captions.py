"""Caption annotations: plan -> extract (one task per shard) -> merge. See vlprep.stages.captions."""

from kfp import dsl
from vlprep_components.config import component


@component
def captions_plan(karpathy: str, dataset: str, test1k_ids: str, out: str, num_shards: int, split: str) -> list:
    from vlprep.stages import captions

    settings = captions.Settings(karpathy=karpathy, dataset=dataset, test1k_ids=test1k_ids)
    return captions.plan(out, settings, num_shards=int(num_shards), split=split)


@component
def captions_extract(spec: dict) -> dict:
    from vlprep.stages import captions

    marker = captions.extract(spec)
    return {k: marker[k] for k in ("shard", "items", "skipped", "failed")}


@component
def captions_merge(shards: list, out: str, report: dsl.Output[dsl.Markdown]) -> dict:
    from vlprep.reports.captions import captions_markdown
    from vlprep.stages import captions

    summary = captions.merge(out)
    summary["skipped_shards"] = sum(1 for s in shards if s["skipped"])
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(captions_markdown(summary))
    return summary
