"""Cross-modal context (Xmodal-Ctx / HAAV): CLIP visual context and retrieved VG phrases per image and crop.

plan (settings, phrase list, phrase shards)
  -> ParallelFor phrase shards: encode phrases (GPU) -> index (caption DB + faiss; GPU when present)
  -> plan images -> ParallelFor image shards: encode images (GPU; whole + 5 + 9 crops)
index + all image shards -> retrieve plan -> ParallelFor image shards: retrieve (GPU) -> merge + HTML report
"""

from kfp import dsl
from vlprep_components.config import configure
from vlprep_components.context import (
    context_encode_images,
    context_encode_phrases,
    context_index,
    context_merge,
    context_plan,
    context_plan_images,
    context_retrieve,
    context_retrieve_plan,
)

PARALLELISM = 8  # GPU pods at once per fan-out; a literal, KFP needs it at compile time


@dsl.pipeline(name="crossmodal-context",
              description="Xmodal-Ctx / HAAV context: vis_ctx.hdf5, caption_db.hdf5, faiss.index, txt_ctx.hdf5")
def crossmodal_context(
    images: str,
    attributes: str,
    relationships: str,
    out: str,
    recipe: str = "xmodal-ctx",
    weights: str = "random:0",
    text_weights: str = "",
    model_cfg: str = "",
    index: str = "ivf",
    topk: str = "",
    attribute_leak: bool = True,
    image_shards: int = 8,
    phrase_shards: int = 4,
    image_batch: int = 0,
    text_batch: int = 0,
    encode_batch: int = 256,
    num_workers: int = 4,
    device: str = "auto",
    image_root: str = "",
):
    plan = configure(
        context_plan(attributes=attributes, relationships=relationships, out=out, recipe=recipe, weights=weights,
                     text_weights=text_weights, model_cfg=model_cfg, index=index, topk=topk,
                     attribute_leak=attribute_leak, phrase_shards=phrase_shards, image_batch=image_batch,
                     text_batch=text_batch, encode_batch=encode_batch),
        "context_plan",
    )
    image_plan = configure(context_plan_images(phrase_shards=plan.output, images=images, out=out,
                                               image_shards=image_shards, image_root=image_root),
                           "context_plan_images")
    with dsl.ParallelFor(plan.output, parallelism=PARALLELISM) as spec:
        phrases = configure(context_encode_phrases(spec=spec, device=device), "context_encode_phrases")
    idx = configure(context_index(shards=dsl.Collected(phrases.output), out=out), "context_index")
    with dsl.ParallelFor(image_plan.output, parallelism=PARALLELISM) as spec:
        encoded = configure(context_encode_images(spec=spec, device=device, num_workers=num_workers),
                            "context_encode_images")
    rplan = configure(context_retrieve_plan(images=dsl.Collected(encoded.output), index=idx.output, out=out),
                      "context_retrieve_plan")
    with dsl.ParallelFor(rplan.output, parallelism=PARALLELISM) as spec:
        retrieved = configure(context_retrieve(spec=spec, device=device), "context_retrieve")
    configure(context_merge(shards=dsl.Collected(retrieved.output), out=out), "context_merge")
