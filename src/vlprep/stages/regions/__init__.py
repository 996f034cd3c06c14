"""Region features (VOLTA / LXMERT): bottom-up-attention detector -> format-neutral shard parts ->
TSV / H5 -> LMDB, hard negatives.

Steps (each a KFP component of the ``regions`` pipeline; :func:`run` runs them in this process, in the
same order):

- :func:`plan`: the settings (``settings.py``) recorded, ``default`` weights pinned once for the run (the
  published file's URL with its sha256, or ``random:0`` with ``weights_fallback`` saying why; arch
  ``tiny`` always takes ``random:0``: the published weights are for the full detector), the sorted image
  list split into shards;
- :func:`extract` (one GPU pod per shard): images decoded in DataLoader workers, batched by the detector
  so that batching never changes an image's result (``models/detection/batching.py`` buckets by resized size); the
  results written as arrays + jsonl (``extract.py``). Undecodable images are skipped and listed in the
  done-marker. A shard is redone when the weights, recipe, its parameters, the architecture or autocast
  change (they are fingerprinted into the plan and the markers);
- :func:`merge`: per split ``resnet101_faster_rcnn_genome_imgfeats/{split}_obj{lo}-{hi}.tsv`` (VOLTA, 13
  fields), ``lxmert/data/mscoco_imgfeat/{split}_obj36.tsv`` (LXMERT, 10) and/or ``h5/...h5``, and
  ``report.html`` (``render.py``; the layout each consumer opens is in ``settings.py``);
- :func:`lmdb`: VOLTA's LMDBs; :func:`hard_negatives`: ``hard_negative.pkl`` (``derived.py``).
"""

from __future__ import annotations

import functools

from vlprep import stage
from vlprep.stages.regions.derived import hard_negatives, lmdb
from vlprep.stages.regions.extract import detector_for, extract, plan, write_results
from vlprep.stages.regions.render import merge
from vlprep.stages.regions.settings import FORMATS, REPORT, STAGE, Settings

__all__ = ["FORMATS", "REPORT", "STAGE", "Settings", "detector_for", "extract", "hard_negatives", "lmdb", "merge",
           "plan", "run", "steps", "write_results"]


def steps(out: str, settings: Settings, *, num_shards: int = 1, split: str = "balanced",
          runtime: stage.Runtime | None = None) -> list[stage.Step]:
    """The pipeline's steps of this stage, in its order (``vlprep_pipelines.regions``; there the
    captions pipeline also runs, before hard negatives)."""
    return [
        stage.Step("plan", lambda: plan(out, settings, num_shards=num_shards, split=split)),
        stage.Step("extract", functools.partial(extract, runtime=runtime), over="plan"),
        stage.Step("merge", lambda: merge(out)),
        stage.Step("lmdb", lambda: lmdb(out)),
        stage.Step("hard_negatives", lambda: hard_negatives(out)),
    ]


def run(out: str, settings: Settings, *, num_shards: int = 1, split: str = "balanced",
        runtime: stage.Runtime | None = None) -> dict:
    """plan -> every shard (done ones skipped) -> merge -> LMDB -> hard negatives, in this process."""
    results = stage.run_local(STAGE.name, steps(out, settings, num_shards=num_shards, split=split, runtime=runtime))
    return {**results["merge"], **results["lmdb"], **results["hard_negatives"],
            "skipped_shards": stage.skipped(results["extract"])}
