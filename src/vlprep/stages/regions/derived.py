"""Outputs derived from the merged features: VOLTA's LMDBs and ``hard_negative.pkl``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlprep import VlprepError, parts, storage
from vlprep.data import ids
from vlprep.stages.regions.render import records
from vlprep.stages.regions.settings import STAGE, VOLTA_DIR, lmdb_path, split_of_tsv

# upstream's LMDB order: train2014 then val2014, then any other folder by name
LMDB_ORDER = {"train2014": 0, "val2014": 1}


def lmdb(out: str) -> dict:
    """VOLTA's LMDBs from the merged 13-field TSVs, in ``resnet101_faster_rcnn_genome_imgfeats/volta/``
    (COCO ``trainval_feat.lmdb`` = train2014 + val2014, ``test_feat.lmdb`` = test2015; Flickr30k
    ``flickr30k_feat.lmdb``), streamed and built beside the
    target, then renamed. Nothing when the settings ask for no LMDB or no VOLTA TSV."""
    from vlprep.formats import volta_lmdb

    settings = STAGE.open(out).settings()
    if not settings.lmdb or "volta-tsv" not in settings.wanted_formats:
        return {"lmdb": {}}
    folder = storage.join(out, VOLTA_DIR)
    tsvs = [u for u in storage.list_prefix(folder) if u.endswith(".tsv") and storage.join(folder, Path(u).name) == u]
    if not tsvs:
        raise VlprepError(f"{folder}: no merged VOLTA TSVs; run the merge step first")
    groups: dict[str, list[str]] = {}
    for uri in tsvs:
        groups.setdefault(lmdb_path(split_of_tsv(Path(uri).name), settings.dataset), []).append(uri)
    built = {}
    for target, uris in sorted(groups.items()):
        uris.sort(key=lambda u: (LMDB_ORDER.get(split_of_tsv(Path(u).name), 9), u))
        dst_uri = storage.join(out, target)
        with parts.Mapped() as local, storage.local_dir_for(dst_uri) as tmp:
            paths = [local.local(u) for u in uris]
            # the builder writes beside tmp and swaps it in; local_dir_for then publishes tmp
            built[dst_uri] = volta_lmdb.build_lmdb_from_tsv(paths, str(tmp), settings.dataset, overwrite=True)["records"]
    return {"lmdb": built}


def hard_negatives(out: str, annotations: str = "") -> dict:
    """``hard_negative.pkl``: the 100 nearest training images by mean-pooled region feature, in the
    order of ``{annotations}/train_ann.jsonl`` (default: the settings' annotations; none: nothing).

    One pass over the shard parts' features (no TSV decoding); training images without features
    are left out and counted."""
    from vlprep.formats import hard_negatives as hn

    work = STAGE.open(out)
    settings = work.settings()
    annotations = annotations or settings.annotations
    if not annotations:
        return {"hard_negatives": None}
    ann = storage.join(annotations, "train_ann.jsonl")
    if not storage.exists(ann):
        raise VlprepError(f"{ann}: missing; run the captions stage first (hard negatives follow its order)")
    train = [ids.caption_id(json.loads(line), settings.dataset) for line in storage.read_text(ann).splitlines()]
    with parts.Mapped() as mapped:
        feats = _mean_features(records(work.collect(), mapped, settings.dataset), settings.dataset)
        try:
            pool = hn.build_hard_negatives(train, feats, skip_missing=True)
        except VlprepError as e:
            raise VlprepError(f"{ann}: {e}") from None
    uri = storage.join(out, "hard_negative.pkl")
    with storage.local_file_for(uri) as dst:
        hn.write_hard_negatives(dst, pool)
    return {"hard_negatives": uri, "train_images": len(pool["train_image_list"]),
            "missing_features": len(train) - len(pool["train_image_list"]),
            "pool_size": int(np.asarray(pool["train_hard_pool"]).shape[1])}


def _mean_features(every, dataset: str):
    """(int id, mean region feature) per image as the merged TSVs hold them: float32, and an id met
    twice in one split counted once (the merge keeps its first row)."""
    from vlprep.formats.hard_negatives import mean_feature

    seen: set[tuple[str, str]] = set()
    for _, split, _, r in every:
        key = (split, str(r["img_id"]))
        if key not in seen:
            seen.add(key)
            yield int(ids.lmdb_key(r["img_id"], dataset)), mean_feature(np.asarray(r["features"], dtype=np.float32))
