"""The plan step (settings, the VG phrase list, the phrase fan-out) and phrase encoding per shard."""

from __future__ import annotations

import hashlib

import numpy as np

from vlprep import VlprepError, stage, storage
from vlprep.data import visual_genome as vg
from vlprep.progress import Progress
from vlprep.stages.context.settings import PHRASES, STAGE, TEXT_FIELDS, Settings, encoder_for, pin_weights


def phrases(attributes: str, relationships: str, out_uri: str, attribute_leak: bool = True) -> dict:
    """Build the VG phrase list (``vlprep.data.visual_genome``) and write it to ``out_uri``, one per line."""
    items = vg.build_phrases(attributes, relationships, attribute_leak=attribute_leak)
    if not items:
        raise VlprepError(f"{attributes}, {relationships}: no phrases (no attributes and no relationships with synsets)")
    with storage.open_write(out_uri) as f:
        n = vg.write_phrases(items, f)
    return {"phrases": n, "out": out_uri, "attribute_leak": attribute_leak}


def read_phrase_file(uri: str) -> list[str]:
    try:
        with storage.open_read(uri) as f:
            return vg.read_phrases(f)
    except FileNotFoundError:
        raise VlprepError(f"{uri}: phrase file missing; run the plan step first") from None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def plan(out: str, settings: Settings, *, num_shards: int = 1, split: str = "balanced") -> list[dict]:
    """The phrase list, the settings recorded, and shards of blocks of ``text_batch`` phrases (item:
    ``[start, end, sha of the block]``); then :func:`vlprep.stages.context.plan_images`. ``default``
    weights are pinned here, once (:func:`vlprep.stages.context.settings.pin_weights`)."""
    built = phrases(settings.attributes, settings.relationships, storage.join(out, PHRASES), settings.attribute_leak)
    if max(settings.topk) > built["phrases"]:
        raise VlprepError(f"top-k {settings.topk} is more than the {built['phrases']} phrases of the corpus; "
                          "pass a smaller topk (whole,five,nine)")
    settings = pin_weights(settings)
    work = STAGE.start(out, settings)
    items = read_phrase_file(storage.join(out, PHRASES))
    b = settings.text_batch
    blocks = [[s, min(s + b, len(items)), _sha("\n".join(items[s:s + b]))] for s in range(0, len(items), b)]
    return work.plan(blocks, num_shards=num_shards, split=split, step="phrases",
                     fingerprint=settings.fingerprint(*TEXT_FIELDS))


def encode_phrases(spec: dict, runtime: stage.Runtime | None = None) -> dict:
    """One phrase shard: ``keys.npy`` (L2-normalized) and ``values.npy`` of its rows, in row order."""
    runtime = runtime or stage.Runtime()
    dev = runtime.resolved_device()

    def work(shard, work: stage.Work) -> dict:
        settings = work.settings()
        phrase_uri = storage.join(work.out, PHRASES)
        items = read_phrase_file(phrase_uri)
        enc = encoder_for(settings, dev)
        keys, values = [], []
        with Progress(f"context phrases {shard.tag}", total=sum(e - s for s, e, _ in shard.items),
                      unit="phrases") as bar:
            for s, e, sha in shard.items:
                block = items[s:e]
                if _sha("\n".join(block)) != sha:
                    raise VlprepError(f"{phrase_uri} changed since the plan (rows {s}-{e}); rerun the plan")
                k, v = enc.encode_texts(block)
                keys.append(k)
                values.append(v)
                bar.advance(len(block))
        shard.save_array("keys.npy", np.concatenate(keys))
        shard.save_array("values.npy", np.concatenate(values))
        return {"parts": ["keys.npy", "values.npy"], "failed": [], "rows": int(sum(len(k) for k in keys)),
                "device": dev, "random_weights": enc.is_random}

    return STAGE.run_shard(spec, work, step="phrases", params={"device": dev})
