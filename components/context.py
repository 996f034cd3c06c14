"""Cross-modal context (Xmodal-Ctx / HAAV). See vlprep.stages.context.

plan (settings, phrases) -> plan_images; plan -> encode_phrases (per phrase shard, GPU) -> build_index (GPU when
faiss sees one) -> encode_images (per image shard, GPU) -> plan_retrieval -> retrieve (per image shard, GPU) -> merge
"""

from kfp import dsl
from vlprep_components.config import component


@component
def context_plan(  # one parameter per setting (vlprep.stages.context.make_settings) + the fan-out
    images: str, image_root: str, attributes: str, relationships: str, recipe: str, weights: str, text_weights: str,
    model_cfg: str, index: str, topk: str, attribute_leak: bool, image_batch: int, text_batch: int, encode_batch: int,
    out: str, phrase_shards: int, split: str,
) -> list:
    from vlprep.stages import context

    settings = context.make_settings(
        images=images, image_root=image_root, attributes=attributes, relationships=relationships, recipe=recipe,
        weights=weights, text_weights=text_weights, model_cfg=model_cfg, index=index, topk=topk,
        attribute_leak=bool(attribute_leak), image_batch=int(image_batch), text_batch=int(text_batch),
        encode_batch=int(encode_batch))
    return context.plan(out, settings, num_shards=int(phrase_shards), split=split)


@component
def context_plan_images(phrase_shards: list, out: str, image_shards: int, split: str) -> list:
    from vlprep.stages import context

    return context.plan_images(out, num_shards=int(image_shards), split=split)


@component
def context_encode_phrases(spec: dict, device: str) -> dict:
    from vlprep import stage
    from vlprep.stages import context

    marker = context.encode_phrases(spec, stage.Runtime(device=device))
    return {k: marker[k] for k in ("shard", "items", "skipped", "failed", "rows")}


@component
def context_build_index(shards: list, out: str) -> dict:
    from vlprep.stages import context

    meta = context.build_index(out)
    return {k: meta[k] for k in ("factory", "nlist", "nprobe", "n", "dim", "gpus", "skipped") if meta[k] is not None}


@component
def context_encode_images(spec: dict, device: str, num_workers: int) -> dict:
    from vlprep import stage
    from vlprep.stages import context

    marker = context.encode_images(spec, stage.Runtime(device=device, num_workers=int(num_workers)))
    return {k: marker[k] for k in ("shard", "items", "skipped", "failed", "images")}


@component
def context_plan_retrieval(images: list, index: dict, out: str) -> list:
    from vlprep.stages import context

    return context.plan_retrieval(out)


@component
def context_retrieve(spec: dict, device: str) -> dict:
    from vlprep import stage
    from vlprep.stages import context

    marker = context.retrieve(spec, stage.Runtime(device=device))
    return {k: marker[k] for k in ("shard", "items", "skipped", "images")}


@component
def context_merge(shards: list, out: str, report: dsl.Output[dsl.HTML]) -> dict:
    import shutil

    from vlprep import storage
    from vlprep.stages import context

    summary = context.merge(out)
    summary["skipped_shards"] = sum(1 for s in shards if s["skipped"])
    with storage.open_read(summary["files"]["context_report.html"]) as src, open(report.path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return summary
