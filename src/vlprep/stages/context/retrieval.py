"""The retrieval fan-out: once every image shard and the index are done, the top-k phrases of each
image's 15 query vectors, one retrieval shard per image shard (same blocks)."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from vlprep import VlprepError, index, parts, shards, stage, storage
from vlprep.stages.context.caption_db import read_index_meta
from vlprep.stages.context.settings import FAISS_INDEX, STAGE, VIEWS

# (view, query rows of an image, queries per image)
VIEW_SLICES = (("whole", slice(0, 1), 1), ("five", slice(1, 6), 5), ("nine", slice(6, 15), 9))


def retrieval_fingerprint(out: str, settings, image_done) -> str:
    """What retrieval results depend on: the index, top-k and the image shards' parts."""
    meta = read_index_meta(out)
    doc = [meta["fingerprint"], meta["files"], list(settings.topk), [m["parts"] for _, m in image_done]]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def plan_retrieval(out: str) -> list[dict]:
    """One retrieval shard per (done) image shard, over the same blocks."""
    work = STAGE.open(out)
    settings = work.settings()
    image_done = work.collect("images")
    doc = work.plan_doc("images")
    specs = work.plan(doc["items"], num_shards=len(doc["bounds"]), split=doc["split"], step="retrieve",
                      fingerprint=retrieval_fingerprint(out, settings, image_done))
    if work.plan_doc("retrieve")["bounds"] != doc["bounds"]:  # same items, count and split: same bounds
        raise VlprepError(f"{work.plan_uri('retrieve')}: retrieval shards do not line up with the image shards")
    return specs


def retrieve(spec: dict, runtime: stage.Runtime | None = None) -> dict:
    """One retrieval shard: top-k row ids and scores for the whole image, each five- and nine-crop.

    Parts (n = images of the matching image shard): ``{view}_ids.npy`` int64 and ``{view}_scores.npy``
    float32, whole (n, k0), five (n, 5, k1), nine (n, 9, k2). One search per view per block.
    """
    runtime = runtime or stage.Runtime()
    use_gpu = None if runtime.device in ("", "auto") else runtime.device.startswith("cuda")

    def work(shard, work: stage.Work) -> dict:
        settings = work.settings()
        image_shard = shards.load({"index": shard.index, "count": shard.count, "plan": work.plan_uri("images")})
        if shards.verify(image_shard, deep=False) is None:
            raise VlprepError(f"{image_shard.marker}: image shard {shard.index} is not done; run image encoding first")
        meta = json.loads(storage.read_text(image_shard.part("images.json")))
        queries = parts.load_npy(image_shard.part("queries.npy"))
        info = read_index_meta(work.out)
        faiss_index = index.load(storage.join(work.out, FAISS_INDEX), info.get("nprobe"), use_gpu)
        res = _search_blocks(faiss_index, queries, np.array([e["block"] for e in meta], dtype=np.int64), settings.topk)
        names = []
        for name, chunks in res.items():
            view = name.split("_")[0]
            k = dict(zip(VIEWS, settings.topk, strict=True))[view]
            lead = (0, k) if view == "whole" else (0, 5 if view == "five" else 9, k)
            dtype = np.int64 if name.endswith("ids") else np.float32
            shard.save_array(f"{name}.npy", np.concatenate(chunks) if chunks else np.zeros(lead, dtype))
            names.append(f"{name}.npy")
        return {"parts": names, "failed": [], "images": len(meta), "index": info["factory"],
                "gpu": bool(index.num_gpus() and use_gpu is not False)}

    return STAGE.run_shard(spec, work, step="retrieve", params={"device": runtime.device})


def _search_blocks(faiss_index, queries: np.ndarray, blocks: np.ndarray, topk) -> dict[str, list]:
    """``{view}_ids`` / ``{view}_scores`` chunks, one search per view per block (so that no result
    depends on where shard boundaries fall)."""
    res = {f"{v}_{t}": [] for v in VIEWS for t in ("ids", "scores")}
    for b in sorted(set(blocks.tolist())):
        q = queries[blocks == b]
        m = len(q)
        for (view, sl, n), k in zip(VIEW_SLICES, topk, strict=True):
            scores, found = index.search(faiss_index, q[:, sl].reshape(m * n, -1), k)
            shape = (m, k) if view == "whole" else (m, n, k)
            res[f"{view}_ids"].append(found.reshape(shape).astype(np.int64))
            res[f"{view}_scores"].append(scores.reshape(shape).astype(np.float32))
    return res
