"""Cross-modal context (Xmodal-Ctx / HAAV): CLIP visual context and retrieved VG phrases per image and crop.

plan (settings, phrase list, phrase shards)
  -> ParallelFor phrase shards: encode phrases (GPU) -> build index (caption DB + faiss; GPU when present)
  -> plan images -> ParallelFor image shards: encode images (GPU; whole + 5 + 9 crops)
index + all image shards -> plan retrieval -> ParallelFor image shards: retrieve (GPU) -> merge + HTML report
"""

from kfp import dsl
from vlprep_components.config import PARALLELISM, configure
from vlprep_components.context import (
    context_build_index,
    context_encode_images,
    context_encode_phrases,
    context_merge,
    context_plan,
    context_plan_images,
    context_plan_retrieval,
    context_retrieve,
)


@dsl.pipeline(name="context",
              description="Xmodal-Ctx / HAAV context: vis_ctx.hdf5, caption_db.hdf5, faiss.index, txt_ctx.hdf5")
def context(  # a pipeline's parameters are its users' settings (vlprep.stages.context.make_settings)
    images: str,
    attributes: str,
    relationships: str,
    out: str,
    recipe: str = "xmodal-ctx",
    weights: str = "default",
    text_weights: str = "",
    model_cfg: str = "",
    index: str = "ivf",
    topk: str = "",
    attribute_leak: bool = True,
    image_shards: int = 8,
    phrase_shards: int = 4,
    split: str = "balanced",
    image_batch: int = 0,
    text_batch: int = 0,
    encode_batch: int = 256,
    num_workers: int = 4,
    device: str = "auto",
    image_root: str = "",
):
    plan = configure(context_plan(
        images=images, image_root=image_root, attributes=attributes, relationships=relationships, recipe=recipe,
        weights=weights, text_weights=text_weights, model_cfg=model_cfg, index=index, topk=topk,
        attribute_leak=attribute_leak, image_batch=image_batch, text_batch=text_batch, encode_batch=encode_batch,
        out=out, phrase_shards=phrase_shards, split=split))
    image_plan = configure(context_plan_images(phrase_shards=plan.output, out=out, image_shards=image_shards,
                                               split=split))
    with dsl.ParallelFor(plan.output, parallelism=PARALLELISM) as spec:
        phrases = configure(context_encode_phrases(spec=spec, device=device))
    idx = configure(context_build_index(shards=dsl.Collected(phrases.output), out=out))
    with dsl.ParallelFor(image_plan.output, parallelism=PARALLELISM) as spec:
        encoded = configure(context_encode_images(spec=spec, device=device, num_workers=num_workers))
    rplan = configure(context_plan_retrieval(images=dsl.Collected(encoded.output), index=idx.output, out=out))
    with dsl.ParallelFor(rplan.output, parallelism=PARALLELISM) as spec:
        retrieved = configure(context_retrieve(spec=spec, device=device))
    configure(context_merge(shards=dsl.Collected(retrieved.output), out=out))
