"""Region features (VOLTA / LXMERT): images -> detector shards on GPUs -> TSV -> LMDB, captions, hard negatives."""

from kfp import dsl
from vlprep_components.config import configure
from vlprep_components.regions import (
    regions_extract,
    regions_hard_negatives,
    regions_lmdb,
    regions_merge,
    regions_plan,
)
from vlprep_pipelines.captions import captions

PARALLELISM = 8  # GPU pods at once; a literal, KFP needs it at compile time


@dsl.pipeline(name="region-features",
              description="Bottom-up-attention region features in VOLTA's corpus layout (TSV, LMDB, captions)")
def region_features(
    images: str,
    out: str,
    karpathy: str,
    annotations: str,
    dataset: str = "coco",
    recipe: str = "caffe36",
    weights: str = "random:0",
    num_shards: int = 8,
    device: str = "cuda",
    batch_size: int = 8,
    num_workers: int = 4,
    arch: str = "full",
    image_root: str = "",
    formats: str = "volta-tsv,lxmert-tsv",
    recipe_params: dict = {},  # noqa: B006 (a KFP default, never mutated)
    vocab_objects: str = "",
    vocab_attributes: str = "",
    autocast: str = "",
    test1k_ids: str = "",
):
    plan = configure(regions_plan(images=images, out=out, num_shards=num_shards, image_root=image_root),
                     "regions_plan")
    with dsl.ParallelFor(plan.output, parallelism=PARALLELISM) as spec:
        extract = configure(
            regions_extract(spec=spec, dataset=dataset, recipe=recipe, weights=weights, device=device,
                            batch_size=batch_size, num_workers=num_workers, arch=arch,
                            recipe_params=recipe_params, autocast=autocast),
            "regions_extract",
        )
    merge = configure(
        regions_merge(shards=dsl.Collected(extract.output), out=out, dataset=dataset, recipe=recipe,
                      formats=formats, recipe_params=recipe_params, vocab_objects=vocab_objects,
                      vocab_attributes=vocab_attributes),
        "regions_merge",
    )
    configure(regions_lmdb(merged=merge.outputs["Output"], out=out, dataset=dataset, recipe=recipe), "regions_lmdb")
    caps = captions(karpathy=karpathy, out=annotations, dataset=dataset, test1k_ids=test1k_ids, num_shards=num_shards)
    configure(
        regions_hard_negatives(merged=merge.outputs["Output"], out=out, annotations=annotations, dataset=dataset),
        "regions_hard_negatives",
    ).after(caps)
