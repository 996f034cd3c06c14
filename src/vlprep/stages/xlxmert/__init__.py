"""X-LXMERT grid / box features and the visual vocabulary.

Steps (each a KFP component of the ``xlxmert`` pipeline; :func:`run` and :func:`run_vocabulary` run them
in this process, in the same order):

- :func:`plan` (``extract.py``): the settings (``settings.py``: kind, dataset, imsize, weights, config,
  arch, autocast) recorded under ``_work/xlxmert/<kind>``, ``default`` weights pinned once (as regions':
  the published URL with its sha256, or ``random:0`` and why; arch ``tiny`` takes ``random:0``), the
  sorted image list split into shards;
  images outside the dataset's split folders or sharing a file stem stop it;
- :func:`extract` (one GPU pod per shard): images decoded in DataLoader workers (no EXIF rotation, as
  upstream's ``PIL.Image.open``), batched by the X-152 detector so that batching never changes an
  image's result (``models/detection/x152.py``: grid8 or boxes36), streamed into parts per split
  folder. A shard is redone when kind, weights, config, arch, autocast or imsize change;
- :func:`merge`: per split, one HDF5 in X-LXMERT's layout and name (``COCO/features/maskrcnn_train_grid8.h5``
  from train2014, ``VG/features/maskrcnn_grid8.h5``, ...; ``vlprep.formats.xlxmert_h5``), streamed
  (memory flat as the dataset grows); ``xlxmert_<kind>_report.html``;
- :func:`kmeans`, :func:`assign_plan`, :func:`assign` (one pod per shard), :func:`assign_merge`
  (``vocabulary.py``): the visual vocabulary under ``clustering/`` and ``xlxmert_clusters_report.html``.
"""

from __future__ import annotations

import functools

from vlprep import stage
from vlprep.stages.xlxmert.extract import detector_for, extract, grid_files, merge, plan
from vlprep.stages.xlxmert.settings import (
    CLUSTERS_REPORT,
    KINDS,
    VOCAB,
    Settings,
    VocabSettings,
    extraction_stage,
    features_report,
)
from vlprep.stages.xlxmert.vocabulary import ASSIGN_BLOCK, assign, assign_merge, assign_plan, kmeans, trained

__all__ = ["ASSIGN_BLOCK", "CLUSTERS_REPORT", "KINDS", "VOCAB", "Settings", "VocabSettings", "assign", "assign_merge",
           "assign_plan", "detector_for", "extract", "extraction_stage", "features_report", "grid_files", "kmeans",
           "merge", "plan", "run", "run_vocabulary", "steps", "trained"]


def extraction_steps(out: str, settings: Settings, *, num_shards: int = 1, split: str = "balanced",
                     runtime: stage.Runtime | None = None) -> list[stage.Step]:
    """plan -> extract (per shard) -> merge of one feature kind."""
    return [
        stage.Step("plan", lambda: plan(out, settings, num_shards=num_shards, split=split)),
        stage.Step("extract", functools.partial(extract, runtime=runtime), over="plan"),
        stage.Step("merge", lambda: merge(out, settings.kind)),
    ]


def vocabulary_steps(out: str, vocab: VocabSettings, *, num_shards: int = 1, split: str = "balanced",
                     runtime: stage.Runtime | None = None) -> list[stage.Step]:
    """kmeans -> assign_plan -> assign (per shard) -> assign_merge."""
    return [
        stage.Step("kmeans", lambda: kmeans(out, vocab, runtime)),
        stage.Step("assign_plan", lambda: assign_plan(out, num_shards=num_shards, split=split)),
        stage.Step("assign", functools.partial(assign, runtime=runtime), over="assign_plan"),
        stage.Step("assign_merge", lambda: assign_merge(out)),
    ]


def steps(out: str, settings: Settings, vocab: VocabSettings | None = None, *, num_shards: int = 1,
          split: str = "balanced", runtime: stage.Runtime | None = None) -> list[stage.Step]:
    """The pipeline's grid branch, in its order: grid8 extraction, then the vocabulary over its files
    (``vocab`` default: every grid file, trained on the first). The pipeline's boxes36 branch is
    :func:`extraction_steps` with ``kind="boxes36"``."""
    kw = {"num_shards": num_shards, "split": split, "runtime": runtime}
    return extraction_steps(out, settings, **kw) + vocabulary_steps(out, vocab or VocabSettings(), **kw)


def run(out: str, settings: Settings, *, num_shards: int = 1, split: str = "balanced",
        runtime: stage.Runtime | None = None) -> dict:
    """One kind's plan -> every shard (done ones skipped) -> merge, in this process (``vlprep xlxmert extract``)."""
    results = stage.run_local(f"xlxmert/{settings.kind}", extraction_steps(out, settings, num_shards=num_shards,
                                                                         split=split, runtime=runtime))
    return {**results["merge"], "skipped_shards": stage.skipped(results["extract"])}


def run_vocabulary(out: str, vocab: VocabSettings, *, num_shards: int = 1, split: str = "balanced",
                   runtime: stage.Runtime | None = None) -> dict:
    """k-means -> assignment shards -> merge, in this process (``vlprep xlxmert kmeans``)."""
    results = stage.run_local(VOCAB.name, vocabulary_steps(out, vocab, num_shards=num_shards, split=split,
                                                           runtime=runtime))
    return {**results["assign_merge"], "kmeans_skipped": results["kmeans"]["skipped"],
            "skipped_shards": stage.skipped(results["assign"])}
