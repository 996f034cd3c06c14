"""The vokenization fan-out: every entry of a tokenized corpus -> the top-k images of the key sets.

- :func:`plan` (the pipeline's *index* step): checks the tokens and the key sets (sorted, as Maria
  concatenates them; every row's dimension against the matcher's), fixes the output name, fingerprints
  the key and token files, and cuts the entries into pages of 512 (Maria's page), so that every shard
  computes exactly the batches one process computes. The exact inner-product index itself is built by
  each shard from the key files (``vokenize.load_key_sets``; faiss-gpu on all GPUs when present): a
  flat index is a copy of the keys, so storing it would only double what is read.
- :func:`vokenize` (one task per shard, GPU): ``vokenize_range`` -> one part (rows, scores).
- :func:`merge`: Maria's ``{corpus}.{sets}{.N}`` and its ``.ids`` from the parts in order, and the report.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time

from vlprep import VlprepError, stage, storage
from vlprep.formats import open_h5
from vlprep.formats import vokens as fmt
from vlprep.models import weights as wts
from vlprep.models.matching import vokenize as vk
from vlprep.stages.vokens import tokens as token_step
from vlprep.stages.vokens.keys import matcher_for, sets_in
from vlprep.stages.vokens.keys import read_summary as read_keys_summary
from vlprep.stages.vokens.settings import (
    REPORT,
    VokenizeSettings,
    check_config,
    corpus_name,
    is_random,
    vokenize_stage,
)

PART = "vokens.npz"
SUMMARY = "summary.json"


def make_settings(*, tokens: str, keys: str, matcher: str, config: str = "maria", image_sets=(), topk: int = vk.TOPK,
                  max_images: int = -1, tokenizer: str = "", page_lines: int = vk.PAGE_LINES) -> VokenizeSettings:
    """Settings from user values: ``tokens`` a prefix or a folder holding one; ``image_sets`` empty = every set of
    ``keys``; ``tokenizer`` empty = the one the corpus was tokenized with (its tokenization record)."""
    from vlprep.models.matching.tokenizer import tokenizer_label

    prefix = token_step.find_tokens(tokens)
    name = prefix.rstrip("/").rsplit("/", 1)[-1]
    if tokenizer:
        label = tokenizer_label(tokenizer)
        if not name.endswith("." + label):
            raise VlprepError(f"{prefix}: not tokenized with {tokenizer!r} (its name does not end in .{label})")
        corpus = name[: -len(label) - 1]
    else:
        record = token_step.read_summary(prefix)
        corpus, tokenizer = corpus_name(record["corpus"]), record["tokenizer"]
    sets = sorted(s.strip() for s in (image_sets.split(",") if isinstance(image_sets, str) else image_sets) if s.strip())
    return VokenizeSettings(
        tokens=prefix, corpus=corpus, tokenizer=tokenizer, keys=str(keys), image_sets=tuple(sets or sets_in(keys)),
        matcher=str(matcher), config=check_config(config), topk=int(topk), max_images=int(max_images),
        page_lines=int(page_lines))


def _files_digest(uris) -> str:
    return hashlib.sha256(json.dumps([[u, storage.sha256(u)] for u in uris]).encode()).hexdigest()[:16]


def plan(out: str, settings: VokenizeSettings, *, num_shards: int = 1, split: str = "balanced") -> list[dict]:
    """Check the inputs, record the settings, and plan pages of the corpus's entries."""
    from vlprep.models.matching.config import get_config

    wts.check_spec(settings.matcher, "--matcher")
    key_sets = vk.load_key_sets(settings.keys, settings.image_sets, max_images=settings.max_images, with_keys=False)
    if not 1 <= settings.topk <= len(key_sets.paths):
        raise VlprepError(f"topk {settings.topk}: the key sets {', '.join(key_sets.sets)} hold {len(key_sets.paths)} "
                          "images; give 1 <= topk <= that")
    dim = get_config(settings.config).dim
    for name in key_sets.sets:
        found = _key_dim(settings.keys, name)
        if found != dim:
            raise VlprepError(f"{storage.join(settings.keys, name)}.hdf5: keys of dimension {found}, the {settings.config} "
                              f"matcher gives {dim}; extract the keys with this matcher")
    if settings.page_lines < 1:
        raise VlprepError(f"page_lines must be >= 1 (got {settings.page_lines})")
    entries = len(fmt.read_offsets(settings.tokens)) - 1
    if entries < 1:
        raise VlprepError(f"{settings.tokens}: no entries to vokenize")
    inputs = [storage.join(settings.keys, f"{n}{ext}") for n in key_sets.sets for ext in (".hdf5", ".path", ".ids")]
    inputs += [settings.tokens + ".line", settings.tokens + ".hdf5"]
    fingerprint = hashlib.sha256((settings.fingerprint() + _files_digest(inputs)).encode()).hexdigest()[:16]
    name = settings.tokens.rstrip("/").rsplit("/", 1)[-1]
    work = vokenize_stage(name).start(out, settings)
    page = settings.page_lines
    items = [[a, min(a + page, entries)] for a in range(0, entries, page)]
    return [{**s, "name": name} for s in work.plan(items, num_shards=num_shards, split=split, fingerprint=fingerprint)]


def _key_dim(keys_dir: str, name: str) -> int:

    with storage.local_copy(storage.join(keys_dir, f"{name}.hdf5")) as path, open_h5(path, "keys HDF5", name=storage.join(keys_dir, f"{name}.hdf5")) as f:
        return int(f[fmt.KEYS_DATASET].shape[1])


@functools.lru_cache(maxsize=1)
def _key_sets(keys: str, image_sets: tuple[str, ...], max_images: int, use_gpu: bool | None,
              fingerprint: str) -> vk.KeySets:
    """The indexed key sets, kept per process beside the matcher (a local run loads them once for all shards);
    ``fingerprint`` (the plan's, over the key files) tells a changed set from the one kept."""
    return vk.load_key_sets(keys, image_sets, max_images=max_images, use_gpu=use_gpu)


def vokenize(spec: dict, runtime: stage.Runtime | None = None) -> dict:
    """One shard: top-k key rows and scores of its entries in one part."""
    runtime = runtime or stage.Runtime()
    dev = runtime.resolved_device()
    use_gpu = None if runtime.device in ("", "auto") else dev.startswith("cuda")

    def run(shard, work: stage.Work) -> dict:
        from vlprep.models.matching.tokenizer import load_tokenizer

        settings = work.settings()
        model = matcher_for(settings.matcher, settings.config, dev)
        key_sets = _key_sets(settings.keys, settings.image_sets, settings.max_images, use_gpu, shard.fingerprint)
        vokenizer = vk.Vokenizer(model.lang_model, load_tokenizer(settings.tokenizer), key_sets, topk=settings.topk,
                                 page_lines=settings.page_lines)
        start, stop = shard.items[0][0], shard.items[-1][1]
        t0 = time.time()
        res = vk.vokenize_range(settings.tokens, start, stop, shard.part(PART), vokenizer)
        return {"parts": [PART], "failed": [], **res, "device": dev, "vokenize_seconds": round(time.time() - t0, 3),
                "random_weights": is_random(settings.matcher)}

    return vokenize_stage(spec["name"]).run_shard(spec, run, params={"device": dev})


def merge(out: str, name: str) -> dict:
    """Maria's vokens file and ``.ids`` of the tokens ``name`` from the shards in order, and the HTML report."""
    from vlprep.reports.vokens import vokens_html

    work = vokenize_stage(name).open(out)
    settings = work.settings()
    done = work.collect()
    key_sets = vk.load_key_sets(settings.keys, settings.image_sets, max_images=settings.max_images, with_keys=False)
    parts = [s.part(PART) for s, _ in done]
    written = vk.merge_vokens(parts, out, settings.corpus, key_sets)
    seconds = sum(m["vokenize_seconds"] for _, m in done)
    summary = {
        "vokens": written["vokens"], "ids": written["vokens"] + ".ids", "report": storage.join(out, REPORT),
        "lines": written["lines"], "images": written["images"], "image_sets": list(settings.image_sets),
        "topk": settings.topk, "matcher": settings.matcher, "random_weights": is_random(settings.matcher),
        "segmented": sum(m["segmented"] for _, m in done), "shards": len(done),
        "lines_per_second": round(written["lines"] / seconds, 1) if seconds else None,
        "tokenize": _tokenize_record(settings.tokens),
        "keys": {s: read_keys_summary(settings.keys, s) for s in settings.image_sets},
    }
    storage.write_text(summary["report"], vokens_html(summary, _samples(settings, parts, key_sets)))
    storage.write_text(work.uri(SUMMARY), json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


def _samples(settings: VokenizeSettings, parts: list[str], key_sets: vk.KeySets, n: int = 8) -> list[dict]:
    """The first ``n`` entries with tokens: their text (decoded ids) and top-k images with scores."""
    from vlprep.models.matching.tokenizer import load_tokenizer

    rows, scores = vk.read_voken_part(parts[0])
    lines = fmt.read_token_lines(settings.tokens, 0, min(len(rows), 64 * n))
    tok = load_tokenizer(settings.tokenizer)
    out = []
    for i, ids in enumerate(lines):
        if len(ids) and len(out) < n:
            images = [{"uri": key_sets.paths[r], "voken": key_sets.voken_ids[r], "score": float(sc)}
                      for r, sc in zip(rows[i].tolist(), scores[i].tolist(), strict=True)]
            out.append({"entry": i, "text": tok.decode(ids.tolist()), "images": images})
    return out


def _tokenize_record(prefix: str) -> dict | None:
    try:
        return token_step.read_summary(prefix)
    except VlprepError:  # tokens made elsewhere: the report says so
        return None
