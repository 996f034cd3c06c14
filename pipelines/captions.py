"""Caption annotations (VOLTA jsonl) with a real fan-out: plan, ParallelFor extract, Collected merge.

Captions are cheap; the fan-out is here to prove the mechanism every GPU stage uses.
"""

from kfp import dsl
from vlprep_components.captions import captions_extract, captions_merge, captions_plan
from vlprep_components.config import PARALLELISM, configure


@dsl.pipeline(name="captions", description="Karpathy split file -> VOLTA caption annotations (jsonl)")
def captions(
    karpathy: str,
    out: str,
    dataset: str = "coco",
    test1k_ids: str = "",
    num_shards: int = 4,
    split: str = "balanced",
):
    plan = configure(captions_plan(karpathy=karpathy, dataset=dataset, test1k_ids=test1k_ids, out=out,
                                   num_shards=num_shards, split=split))
    with dsl.ParallelFor(plan.output, parallelism=PARALLELISM) as spec:
        extract = configure(captions_extract(spec=spec))
    configure(captions_merge(shards=dsl.Collected(extract.output), out=out))
