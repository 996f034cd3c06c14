"""The image-key fan-out: an image set -> ``{set}.hdf5`` + ``.path`` + ``.ids`` (Maria's keys folder).

The plan fixes the set's ids and URIs in their stated order (``vlprep.models.matching.keys``) in
``_work/vokens_keys/{set}/images.json`` and cuts positions into blocks of ``batch_size`` (so every shard
runs exactly the batches one process would); each shard runs the matcher's image tower over its blocks
(``extract_keys``; undecodable images skipped and listed in its marker); the merge concatenates the parts
in order. The same parts give the same bytes, so a rerun (done shards skipped) is idempotent.
"""

from __future__ import annotations

import hashlib
import json
import time

from vlprep import VlprepError, stage, storage
from vlprep.models import weights as wts
from vlprep.models.matching import keys as mk
from vlprep.stages.vokens.settings import KeySettings, check_config, is_random, keys_stage

PART = "keys.npz"
IMAGES = "images.json"
SUMMARY = "summary.json"


def image_set_for(settings: KeySettings) -> mk.ImageSet:
    """The set the settings name: an LXMERT JSON or ids file (images under ``image_root``), or a folder."""
    src, root = str(settings.images), settings.image_root
    if src.endswith((".json", ".ids")):
        if not root:
            raise VlprepError(f"{src}: give image_root (the folder holding the images of its ids)")
        if src.endswith(".json"):
            return mk.image_set_from_lxmert(settings.image_set, src, root)
        return mk.image_set_from_ids(settings.image_set, src, root)
    if root:
        raise VlprepError(f"{src}: image_root is for an ids file or an LXMERT JSON; a folder is its own root")
    return mk.image_set_from_folder(settings.image_set, src)


def keys_plan(out: str, settings: KeySettings, *, num_shards: int = 1, split: str = "balanced") -> list[dict]:
    """Record the settings and the set's images; plan blocks of ``batch_size`` positions."""
    check_config(settings.config)
    wts.check_spec(settings.matcher, "--matcher")
    if settings.batch_size < 1:
        raise VlprepError(f"batch_size must be >= 1 (got {settings.batch_size})")
    image_set = image_set_for(settings)
    if not image_set.ids:
        raise VlprepError(f"{settings.images}: image set {settings.image_set!r} has no images")
    work = keys_stage(settings.image_set).start(out, settings)
    listing = json.dumps({"ids": image_set.ids, "uris": image_set.uris}, ensure_ascii=False)
    storage.write_text(work.uri(IMAGES), listing)
    b = settings.batch_size
    items = [[a, min(a + b, len(image_set.ids))] for a in range(0, len(image_set.ids), b)]
    fingerprint = hashlib.sha256((settings.fingerprint() + listing).encode()).hexdigest()[:16]
    specs = work.plan(items, num_shards=num_shards, split=split, fingerprint=fingerprint)
    return [{**s, "name": settings.image_set} for s in specs]


def matcher_for(spec: str, config: str, device: str):
    """The matcher in eval mode on ``device`` (one kept per process: keys and vokens share it)."""
    from vlprep.models.matching.model import load_matcher

    model = stage.cached_model(("matcher", spec, config), lambda: load_matcher(spec, config))
    return model.to(device)


def keys(spec: dict, runtime: stage.Runtime | None = None) -> dict:
    """One shard: the keys of its images in one part; unreadable images listed as failed."""
    runtime = runtime or stage.Runtime()
    dev = runtime.resolved_device()

    def run(shard, work: stage.Work) -> dict:
        from vlprep.models.matching.config import get_config
        from vlprep.models.matching.images import eval_transform

        settings = work.settings()
        listing = json.loads(storage.read_text(work.uri(IMAGES)))
        image_set = mk.ImageSet(settings.image_set, listing["ids"], listing["uris"])
        model = matcher_for(settings.matcher, settings.config, dev)
        start, stop = shard.items[0][0], shard.items[-1][1]
        t0 = time.time()
        res = mk.extract_keys(model.visn_model, image_set, start, stop, shard.part(PART),
                              transform=eval_transform(get_config(settings.config)),
                              batch_size=settings.batch_size, num_workers=runtime.num_workers)
        return {"parts": [PART], "failed": res["failed"], "images": res["count"], "device": dev,
                "keys_seconds": round(time.time() - t0, 3), "random_weights": is_random(settings.matcher)}

    return keys_stage(spec["name"]).run_shard(spec, run, params={"device": dev})


def keys_merge(out: str, image_set: str) -> dict:
    """``{set}.hdf5``, ``.path`` and ``.ids`` from the shards in order; returns counts and the skipped images."""
    work = keys_stage(image_set).open(out)
    settings = work.settings()
    done = work.collect()
    merged = mk.merge_keys([s.part(PART) for s, _ in done], out, image_set)
    seconds = sum(m["keys_seconds"] for _, m in done)
    tried = sum(m["images"] + len(m["failed"]) for _, m in done)
    summary = {
        "keys": out, "image_set": image_set, "images": merged["images"], "dim": merged["dim"],
        "failed": [f for _, m in done for f in m["failed"]], "matcher": settings.matcher,
        "random_weights": is_random(settings.matcher), "shards": len(done),
        "images_per_second": round(tried / seconds, 2) if seconds else None,
    }
    storage.write_text(work.uri(SUMMARY), json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def read_summary(keys_dir: str, image_set: str) -> dict | None:
    """The merge summary of one image set, or None for keys extracted elsewhere (e.g. by upstream)."""
    try:
        return json.loads(storage.read_text(keys_stage(image_set).open(keys_dir).uri(SUMMARY)))
    except FileNotFoundError:
        return None


def sets_in(keys_dir: str) -> list[str]:
    """The image sets of a keys folder (every ``{set}.hdf5`` with its ``.ids``), sorted."""
    root = str(keys_dir).rstrip("/")
    found = [u for u in storage.list_prefix(root) if storage.parent(u) == root]
    names = sorted(u.rsplit("/", 1)[-1][: -len(".hdf5")] for u in found if u.endswith(".hdf5"))
    sets = [n for n in names if storage.join(root, n + ".ids") in found]
    if not sets:
        raise VlprepError(f"{keys_dir}: no image set keys ({{set}}.hdf5 + .ids); run `vlprep vokens keys` first")
    return sets
