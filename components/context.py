"""Cross-modal context (Xmodal-Ctx / HAAV). See vlprep.stages.context.

plan (settings, phrases) -> plan_images; plan -> encode_phrases (per phrase shard, GPU) -> index (GPU when faiss sees one)
     -> encode_images (per image shard, GPU) -> retrieve_plan -> retrieve (per image shard, GPU) -> merge
"""

from kfp import dsl
from vlprep_components.config import image


@dsl.component(base_image=image("context_plan"), install_kfp_package=False)
def context_plan(
    attributes: str,
    relationships: str,
    out: str,
    recipe: str,
    weights: str,
    text_weights: str,
    model_cfg: str,
    index: str,
    topk: str,
    attribute_leak: bool,
    phrase_shards: int,
    image_batch: int,
    text_batch: int,
    encode_batch: int,
) -> list:
    from vlprep.stages import context

    p = context.plan(attributes, relationships, out, int(phrase_shards), recipe, weights, text_weights, model_cfg,
                     index, topk, int(image_batch), int(text_batch), int(encode_batch), bool(attribute_leak))
    return p["phrases"]


@dsl.component(base_image=image("context_plan_images"), install_kfp_package=False)
def context_plan_images(phrase_shards: list, images: str, out: str, image_shards: int, image_root: str) -> list:
    from vlprep.stages import context

    return context.plan_images(images, out, int(image_shards), image_root)


@dsl.component(base_image=image("context_encode_phrases"), install_kfp_package=False)
def context_encode_phrases(spec: dict, device: str) -> dict:
    from vlprep.stages import context

    marker = context.encode_phrases(spec, device)
    return {k: marker[k] for k in ("shard", "items", "skipped", "failed", "rows")}


@dsl.component(base_image=image("context_index"), install_kfp_package=False)
def context_index(shards: list, out: str) -> dict:
    from vlprep.stages import context

    meta = context.build_index(out)
    return {k: meta[k] for k in ("factory", "nlist", "nprobe", "n", "dim", "gpus", "skipped") if meta[k] is not None}


@dsl.component(base_image=image("context_encode_images"), install_kfp_package=False)
def context_encode_images(spec: dict, device: str, num_workers: int) -> dict:
    from vlprep.stages import context

    marker = context.encode_images(spec, device, int(num_workers))
    return {k: marker[k] for k in ("shard", "items", "skipped", "failed", "images")}


@dsl.component(base_image=image("context_retrieve_plan"), install_kfp_package=False)
def context_retrieve_plan(images: list, index: dict, out: str) -> list:
    from vlprep.stages import context

    return context.plan_retrieval(out)


@dsl.component(base_image=image("context_retrieve"), install_kfp_package=False)
def context_retrieve(spec: dict, device: str) -> dict:
    from vlprep.stages import context

    marker = context.retrieve(spec, device)
    return {k: marker[k] for k in ("shard", "items", "skipped", "images")}


@dsl.component(base_image=image("context_merge"), install_kfp_package=False)
def context_merge(shards: list, out: str, report: dsl.Output[dsl.HTML]) -> dict:
    import shutil

    from vlprep import storage
    from vlprep.stages import context

    summary = context.merge(out)
    summary["skipped_shards"] = sum(1 for s in shards if s["skipped"])
    with storage.open_read(summary["files"]["context_report.html"]) as src, open(report.path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return summary
