"""The embedded default: every workflow on the bundled sample data, run by ``make run``.

Its parameters are plain paths (KFP cannot concatenate strings into a nested pipeline's inputs);
``local_params`` fills them in for a local run from the sample directory and the run directory.
"""

from kfp import dsl
from vlprep_pipelines.captions import captions


@dsl.pipeline(name="demo", description="All vlprep workflows on one small dataset")
def demo(karpathy: str, test1k_ids: str, annotations: str, num_shards: int = 2):
    captions(karpathy=karpathy, out=annotations, dataset="coco", test1k_ids=test1k_ids, num_shards=num_shards)


def local_params(sample: str, run_dir: str) -> dict:
    """The demo's parameters for the bundled sample, writing into ``run_dir`` (VOLTA's corpus layout)."""
    return {
        "karpathy": f"{sample}/dataset_coco.json",
        "test1k_ids": f"{sample}/test1k_ids.txt",
        "annotations": f"{run_dir}/mscoco/annotations",
    }
