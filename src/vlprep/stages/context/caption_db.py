"""The index step: the phrase shards merged into ``caption_db.hdf5``, the faiss index, and the values
(memory-mapped ``.npy``) the final merge looks phrases up in.

Keys are concatenated in row order; the index is ``vlprep.index.build`` of the settings' kind (upstream's
``IVF{K},Flat`` inner product, or ``flat``), on GPUs when faiss sees any. A finished index is reused when
its inputs (settings and phrase parts) are unchanged and its files verify.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import numpy as np

from vlprep import VlprepError, index, parts, storage
from vlprep.stages.context.phrases import read_phrase_file
from vlprep.stages.context.settings import CAPTION_DB, FAISS_INDEX, PHRASES, STAGE

VALUES = "values.npy"


def _meta_uri(work) -> str:
    return work.uri("index", "index.json")


def _verify_files(out: str, files: dict) -> bool:
    for rel, sha in files.items():
        uri = storage.join(out, rel)
        if not storage.exists(uri) or storage.sha256(uri) != sha:
            return False
    return True


def read_index_meta(out: str) -> dict:
    uri = _meta_uri(STAGE.open(out))
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise VlprepError(f"{uri}: no index yet; run the index step first") from None


def build_index(out: str, use_gpu: bool | None = None) -> dict:
    """Merge the phrase shards: ``caption_db.hdf5``, the faiss index, and the values for the merge."""
    work = STAGE.open(out)
    settings = work.settings()
    done = work.collect("phrases")
    fingerprint = hashlib.sha256(json.dumps(
        [settings.index, settings.recipe, [m["parts"] for _, m in done]], sort_keys=True).encode()).hexdigest()
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
        meta = json.loads(storage.read_text(_meta_uri(work)))
        if meta["fingerprint"] == fingerprint and _verify_files(out, meta["files"]):
            return {**meta, "skipped": True}

    keys = np.concatenate([parts.load_npy(s.part("keys.npy")) for s, _ in done])
    texts = read_phrase_file(storage.join(out, PHRASES))
    if len(texts) != len(keys):
        raise VlprepError(f"{storage.join(out, PHRASES)} has {len(texts)} phrases but the shards encoded {len(keys)}; "
                          "rerun the plan")
    values_rel = storage.join("_work", STAGE.name, "index", VALUES)
    value_dim = _write_db(out, values_rel, done, keys, texts, settings.recipe)
    built, info = index.build(keys, settings.index, use_gpu)
    index.save(built, storage.join(out, FAISS_INDEX))
    files = {rel: storage.sha256(storage.join(out, rel)) for rel in (CAPTION_DB, FAISS_INDEX, values_rel)}
    meta = {"fingerprint": fingerprint, "files": files, "value_dim": int(value_dim), "key_dim": int(keys.shape[1]),
            "values": values_rel, **info}
    storage.write_text(_meta_uri(work), json.dumps(meta, indent=1, sort_keys=True))
    return {**meta, "skipped": False}


def _write_db(out: str, values_rel: str, done, keys: np.ndarray, texts: list[str], recipe_name: str) -> int:
    """``values.npy`` (rows in order, memory-mapped) and ``caption_db.hdf5``; returns the value width."""
    from vlprep.formats import ctx_h5
    from vlprep.models.clip import get_recipe

    batch = get_recipe(recipe_name).caption_batch
    with storage.local_file_for(storage.join(out, values_rel)) as vpath, \
            storage.local_file_for(storage.join(out, CAPTION_DB)) as dbpath:
        first = parts.load_npy(done[0][0].part("values.npy"))
        value_dim = first.shape[1]
        vals = np.lib.format.open_memmap(vpath, mode="w+", dtype=np.float32, shape=(len(keys), value_dim))
        row = 0
        for s, _ in done:
            part = first if s is done[0][0] else parts.load_npy(s.part("values.npy"))
            vals[row:row + len(part)] = part
            row += len(part)
        vals.flush()
        with ctx_h5.CaptionDbWriter(dbpath, recipe_name, key_dim=keys.shape[1], value_dim=value_dim) as db:
            for start in range(0, len(keys), batch):
                db.add_batch(keys[start:start + batch], vals[start:start + batch], texts[start:start + batch])
        del vals
    return value_dim
