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

import json

from vlprep import VlprepError, shards, storage
from vlprep.data import karpathy

STAGE = "captions"
# output file -> the Karpathy splits (parts) it is made of, in order
OUTPUTS = {
    "coco": {"train_ann.jsonl": ["train", "restval"], "valid_ann.jsonl": ["val"], "test_ann.jsonl": ["test"]},
    "flickr30k": {"train_ann.jsonl": ["train"], "valid_ann.jsonl": ["val"], "test_ann.jsonl": ["test"]},
}
TEST1K = "test1k"


def line(entry: karpathy.Entry, dataset: str) -> str:
    if dataset == "coco":
        obj = {"sentences": list(entry.sentences), "id": entry.cocoid}
    else:
        obj = {"sentences": list(entry.sentences), "id": entry.stem, "img_path": entry.filename}
    return json.dumps(obj, ensure_ascii=False) + "\n"


def work_dir(out: str) -> str:
    """Where the plan, shard parts and done-markers go."""
    return storage.join(out, "_work", STAGE)


def plan(karpathy_uri: str, dataset: str, out: str, num_shards: int = 1) -> list[dict]:
    """Validate the split file and plan shards over its entry indices."""
    entries = karpathy.load(karpathy_uri, dataset)
    return shards.plan(range(len(entries)), num_shards, work_dir(out))


def extract(spec: dict, karpathy_uri: str, dataset: str, test1k_ids: str = "") -> dict:
    """Write one shard's parts: ``{split}.jsonl`` per Karpathy split (+ ``test1k.jsonl``)."""
    ids = set(karpathy.read_ids(test1k_ids)) if test1k_ids else None
    if ids is not None and dataset != "coco":
        raise VlprepError("--test1k-ids is a COCO option (VOLTA's test1k_ids.txt); drop it for flickr30k")

    def work(shard: shards.Shard) -> dict:
        entries = karpathy.load(karpathy_uri, dataset)
        parts = {s: [] for s in karpathy.SPLITS}
        if ids is not None:
            parts[TEST1K] = []
        for i in shard.items:
            e = entries[int(i)]
            parts[e.split].append(line(e, dataset))
            if ids is not None and e.cocoid in ids:
                parts[TEST1K].append(line(e, dataset))
        for name, lines in parts.items():
            storage.write_text(shard.part(f"{name}.jsonl"), "".join(lines))
        return {"parts": [f"{n}.jsonl" for n in parts], "failed": [], "lines": {n: len(v) for n, v in parts.items()}}

    params = {"karpathy": karpathy_uri, "dataset": dataset, "test1k_ids": test1k_ids}
    return shards.run_shard(spec, work, STAGE, params)


def merge(dataset: str, out: str, test1k_ids: str = "") -> dict:
    """Concatenate the verified shard parts into the annotation files under ``out``."""
    plan_uri = storage.join(work_dir(out), "plan.json")
    done = shards.collect(plan_uri)
    outputs = dict(OUTPUTS[dataset])
    if test1k_ids:
        outputs["test1k_ann.jsonl"] = [TEST1K]
        if any(f"{TEST1K}.jsonl" not in {p["name"] for p in m["parts"]} for _, m in done):
            raise VlprepError(f"{plan_uri}: shards were extracted without --test1k-ids; rerun them with it")
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
    if test1k_ids:
        wanted = len(set(karpathy.read_ids(test1k_ids)))
        counts["test1k_missing_ids"] = wanted - counts["test1k_ann.jsonl"]
    return {"stage": STAGE, "dataset": dataset, "out": out, "files": counts, "shards": len(done)}


def run(karpathy_uri: str, dataset: str, out: str, test1k_ids: str = "", num_shards: int = 1) -> dict:
    """The whole stage in one process: plan, every shard (done ones skipped), merge."""
    specs = plan(karpathy_uri, dataset, out, num_shards)
    for spec in specs:
        extract(spec, karpathy_uri, dataset, test1k_ids)
    return merge(dataset, out, test1k_ids)
