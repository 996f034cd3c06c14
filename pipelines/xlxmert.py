"""X-LXMERT: grid8 features -> visual vocabulary, and boxes36 features.

plan (grid8) -> ParallelFor shards: extract (GPU) -> merge (HDF5 per split) -> kmeans (GPU) -> assign_plan
  -> ParallelFor shards: assign (GPU) -> assign_merge (clustering/ files + report)
plan (boxes36) -> ParallelFor shards: extract (GPU) -> merge           (when boxes36 is true)
"""

from kfp import dsl
from vlprep_components.config import PARALLELISM, configure
from vlprep_components.xlxmert import (
    xlxmert_assign,
    xlxmert_assign_merge,
    xlxmert_assign_plan,
    xlxmert_extract,
    xlxmert_kmeans,
    xlxmert_merge,
    xlxmert_plan,
)


def _features(kind: str, imsize, **kw):
    """plan -> extract per shard -> merge of one kind; returns the merge task."""
    plan = configure(xlxmert_plan(
        images=kw["images"], image_root=kw["image_root"], dataset=kw["dataset"], kind=kind, weights=kw["weights"],
        config=kw["config"], arch=kw["arch"], autocast=kw["autocast"], imsize=imsize, out=kw["out"],
        num_shards=kw["num_shards"], split=kw["split"]))
    with dsl.ParallelFor(plan.output, parallelism=PARALLELISM) as spec:
        extract = configure(xlxmert_extract(spec=spec, device=kw["device"], batch_size=kw["batch_size"],
                                            num_workers=kw["num_workers"]))
    return configure(xlxmert_merge(shards=dsl.Collected(extract.output), out=kw["out"], kind=kind))


@dsl.pipeline(name="xlxmert",
              description="X-LXMERT grid8 / boxes36 features (maskrcnn_*.h5) and the k-means visual vocabulary")
def xlxmert(  # a pipeline's parameters are its users' settings (vlprep.stages.xlxmert Settings, VocabSettings)
    images: str,
    out: str,
    dataset: str = "coco",
    weights: str = "default",
    config: str = "",
    arch: str = "full",
    autocast: str = "",
    imsize: int = 0,
    image_root: str = "",
    num_shards: int = 8,
    split: str = "balanced",
    device: str = "cuda",
    batch_size: int = 8,
    num_workers: int = 4,
    boxes36: bool = True,
    features: list = [],  # noqa: B006 (a KFP default, never mutated); [] = every grid8 file extracted here
    src: str = "",
    k: int = 10000,
    niter: int = 20,
    dim: int = 2048,
    seed: int = 1234,
    max_points_per_centroid: int = 256,
    nredo: int = 1,
    assign_shards: int = 8,
):
    kw = {"images": images, "image_root": image_root, "dataset": dataset, "weights": weights, "config": config,
          "arch": arch, "autocast": autocast, "out": out, "num_shards": num_shards, "split": split, "device": device,
          "batch_size": batch_size, "num_workers": num_workers}
    grid = _features("grid8", imsize, **kw)
    trained = configure(xlxmert_kmeans(
        merged=grid.outputs["Output"], out=out, features=features, src=src, k=k, niter=niter, dim=dim, seed=seed,
        max_points_per_centroid=max_points_per_centroid, nredo=nredo, imsize=imsize, images=images, device=device))
    plan = configure(xlxmert_assign_plan(trained=trained.output, out=out, num_shards=assign_shards, split=split))
    with dsl.ParallelFor(plan.output, parallelism=PARALLELISM) as spec:
        assigned = configure(xlxmert_assign(spec=spec, device=device))
    configure(xlxmert_assign_merge(shards=dsl.Collected(assigned.output), out=out))
    with dsl.If(boxes36 == True):  # noqa: E712 (a KFP condition, not a Python comparison)
        _features("boxes36", 0, **kw)
