"""Caption annotations in VOLTA's layout (``data/*/extract_captions.py``).

COCO: one ``{"sentences": [raw, ...], "id": cocoid}`` per image.
    train_ann.jsonl = Karpathy ``train`` then ``restval`` (each in file order),
    valid_ann.jsonl = ``val``, test_ann.jsonl = ``test``,
    test1k_ann.jsonl = every image whose cocoid is in the id list (file order), when one is given.
Flickr30k: ``{"sentences": [...], "id": stem, "img_path": filename}`` into train/valid/test_ann.jsonl.

Lines are written as the ``jsonlines`` writer upstream used writes them: ``json.dumps`` with
``ensure_ascii=False`` (UTF-8, unescaped) and default separators, one object per line.

Fan-out: the items are entry indices; a shard writes one part per Karpathy split; the merge
concatenates the parts in shard order, so the output does not depend on the shard count.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from vlprep import VlprepError, stage, storage
from vlprep.data import karpathy

# output file -> the Karpathy splits (parts) it is made of, in order
OUTPUTS = {
    "coco": {"train_ann.jsonl": ["train", "restval"], "valid_ann.jsonl": ["val"], "test_ann.jsonl": ["test"]},
    "flickr30k": {"train_ann.jsonl": ["train"], "valid_ann.jsonl": ["val"], "test_ann.jsonl": ["test"]},
}
TEST1K = "test1k"


@dataclass(frozen=True)
class Settings(stage.Settings):
    karpathy: str  # dataset_coco.json / dataset_flickr30k.json (path or gs://)
    dataset: str = "coco"
    test1k_ids: str = ""  # COCO: file of image ids for test1k_ann.jsonl


STAGE = stage.Stage("captions", Settings)


def line(entry: karpathy.Entry, dataset: str) -> str:
    if dataset == "coco":
        obj = {"sentences": list(entry.sentences), "id": entry.cocoid}
    else:
        obj = {"sentences": list(entry.sentences), "id": entry.stem, "img_path": entry.filename}
    return json.dumps(obj, ensure_ascii=False) + "\n"


def plan(out: str, settings: Settings, *, num_shards: int = 1, split: str = "balanced") -> list[dict]:
    """Validate the split file (and the test1k ids) and plan shards over its entry indices."""
    if settings.dataset not in OUTPUTS:
        raise VlprepError(f"dataset {settings.dataset!r}: use one of {', '.join(OUTPUTS)}")
    if settings.test1k_ids and settings.dataset != "coco":
        raise VlprepError("--test1k-ids is a COCO option (VOLTA's test1k_ids.txt); drop it for flickr30k")
    entries = karpathy.load(settings.karpathy, settings.dataset)
    if settings.test1k_ids:
        karpathy.read_ids(settings.test1k_ids)
    work = STAGE.start(out, settings)
    return work.plan(range(len(entries)), num_shards=num_shards, split=split)


def extract(spec: dict, runtime: stage.Runtime | None = None) -> dict:
    """Write one shard's parts: ``{split}.jsonl`` per Karpathy split (+ ``test1k.jsonl``)."""

    def work(shard, work: stage.Work) -> dict:
        settings = work.settings()
        entries = karpathy.load(settings.karpathy, settings.dataset)
        ids = set(karpathy.read_ids(settings.test1k_ids)) if settings.test1k_ids else None
        parts = {s: [] for s in karpathy.SPLITS}
        if ids is not None:
            parts[TEST1K] = []
        for i in shard.items:
            e = entries[int(i)]
            parts[e.split].append(line(e, settings.dataset))
            if ids is not None and e.cocoid in ids:
                parts[TEST1K].append(line(e, settings.dataset))
        for name, lines in parts.items():
            shard.write_part(f"{name}.jsonl", "".join(lines).encode("utf-8"))
        return {"parts": [f"{n}.jsonl" for n in parts], "failed": [], "lines": {n: len(v) for n, v in parts.items()}}

    return STAGE.run_shard(spec, work)


def merge(out: str) -> dict:
    """Concatenate the verified shard parts into the annotation files under ``out``."""
    work = STAGE.open(out)
    settings = work.settings()
    done = work.collect()
    outputs = dict(OUTPUTS[settings.dataset])
    if settings.test1k_ids:
        outputs["test1k_ann.jsonl"] = [TEST1K]
    counts = {}
    for name, splits in outputs.items():
        n = 0
        with storage.open_write(storage.join(out, name)) as f:
            for split in splits:
                for shard, _ in done:
                    with storage.open_read(shard.part(f"{split}.jsonl")) as src:
                        for row in src:
                            f.write(row)
                            n += 1
        counts[name] = n
    if settings.test1k_ids:
        wanted = len(set(karpathy.read_ids(settings.test1k_ids)))
        counts["test1k_missing_ids"] = wanted - counts["test1k_ann.jsonl"]
    return {"stage": STAGE.name, "dataset": settings.dataset, "out": out, "files": counts, "shards": len(done)}


def steps(out: str, settings: Settings, *, num_shards: int = 1, split: str = "balanced",
          runtime: stage.Runtime | None = None) -> list[stage.Step]:
    """The pipeline's steps, in its order (``vlprep_pipelines.captions``)."""
    return [
        stage.Step("plan", lambda: plan(out, settings, num_shards=num_shards, split=split)),
        stage.Step("extract", functools.partial(extract, runtime=runtime), over="plan"),
        stage.Step("merge", lambda: merge(out)),
    ]


def run(out: str, settings: Settings, *, num_shards: int = 1, split: str = "balanced",
        runtime: stage.Runtime | None = None) -> dict:
    """The whole stage in this process: plan, every shard (done ones skipped), merge."""
    results = stage.run_local(STAGE.name, steps(out, settings, num_shards=num_shards, split=split, runtime=runtime))
    return {**results["merge"], "skipped_shards": stage.skipped(results["extract"])}
