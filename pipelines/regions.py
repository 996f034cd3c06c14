"""Region features (VOLTA / LXMERT): images -> detector shards on GPUs -> TSV -> LMDB, captions, hard negatives."""

from kfp import dsl
from vlprep_components.config import PARALLELISM, configure
from vlprep_components.regions import (
    regions_extract,
    regions_hard_negatives,
    regions_lmdb,
    regions_merge,
    regions_plan,
)
from vlprep_pipelines.captions import captions


@dsl.pipeline(name="regions",
              description="Bottom-up-attention region features in VOLTA's corpus layout (TSV, LMDB, captions)")
def regions(  # a pipeline's parameters are its users' settings (vlprep.stages.regions.Settings)
    images: str,
    out: str,
    karpathy: str,
    annotations: str,
    dataset: str = "coco",
    recipe: str = "caffe36",
    weights: str = "default",
    num_shards: int = 8,
    split: str = "balanced",
    device: str = "cuda",
    batch_size: int = 8,
    num_workers: int = 4,
    arch: str = "full",
    image_root: str = "",
    formats: str = "volta-tsv,lxmert-tsv",
    lmdb: bool = True,
    recipe_params: dict = {},  # noqa: B006 (a KFP default, never mutated)
    vocab_objects: str = "",
    vocab_attributes: str = "",
    autocast: str = "",
    test1k_ids: str = "",
):
    plan = configure(regions_plan(
        images=images, image_root=image_root, dataset=dataset, recipe=recipe, recipe_params=recipe_params,
        weights=weights, arch=arch, autocast=autocast, formats=formats, lmdb=lmdb, annotations=annotations,
        vocab_objects=vocab_objects, vocab_attributes=vocab_attributes, out=out, num_shards=num_shards, split=split))
    with dsl.ParallelFor(plan.output, parallelism=PARALLELISM) as spec:
        extract = configure(regions_extract(spec=spec, device=device, batch_size=batch_size, num_workers=num_workers))
    merge = configure(regions_merge(shards=dsl.Collected(extract.output), out=out))
    configure(regions_lmdb(merged=merge.outputs["Output"], out=out))
    caps = captions(karpathy=karpathy, out=annotations, dataset=dataset, test1k_ids=test1k_ids, num_shards=num_shards,
                    split=split)
    configure(regions_hard_negatives(merged=merge.outputs["Output"], out=out)).after(caps)
