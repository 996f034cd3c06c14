"""The tokenization fan-out: a line corpus -> Maria's ``{corpus}.{tokenizer}`` (+ ``.line``, ``.hdf5``).

The plan counts the lines once and cuts them into blocks of ``block_lines`` (item: ``[start, stop, byte
offset of start]``, so a shard seeks to its first line instead of scanning); each shard tokenizes its
blocks into one part (``vlprep.data.text_corpus.tokenize_range``); the merge concatenates the parts in
order (``merge_tokens``), so the files are identical for any number of shards.
"""

from __future__ import annotations

import json
import time

from vlprep import VlprepError, stage, storage
from vlprep.data import text_corpus as tc
from vlprep.models.matching.tokenizer import load_tokenizer, tokenizer_label
from vlprep.stages.vokens.settings import TokenizeSettings, corpus_name, tokenize_stage

PART = "tokens.npz"
SUMMARY = "summary.json"


def prefix_name(corpus: str, tokenizer: str) -> str:
    """``{corpus file name}.{tokenizer name}``: the tokens files' common name (and their work's)."""
    return f"{corpus_name(corpus)}.{tokenizer_label(tokenizer)}"


def tokenize_plan(out: str, settings: TokenizeSettings, *, num_shards: int = 1, split: str = "balanced") -> list[dict]:
    """Record the settings and plan line blocks of the corpus over ``num_shards`` shards."""
    if settings.retrieval_input not in ("", *tc.RETRIEVAL_INPUTS):
        raise VlprepError(f"retrieval_input {settings.retrieval_input!r}: use '' (by file name) or one of "
                          f"{', '.join(tc.RETRIEVAL_INPUTS)}")
    if settings.block_lines < 1:
        raise VlprepError(f"block_lines must be >= 1 (got {settings.block_lines})")
    load_tokenizer(settings.tokenizer)  # a bad spec stops here, not in every shard
    total = tc.count_lines(settings.corpus)
    starts = list(range(0, total, settings.block_lines))
    offsets = tc.byte_offsets(settings.corpus, starts)
    items = [[s, min(s + settings.block_lines, total), b] for s, b in zip(starts, offsets, strict=True)]
    name = prefix_name(settings.corpus, settings.tokenizer)
    work = tokenize_stage(name).start(out, settings)
    return [{**s, "name": name} for s in work.plan(items, num_shards=num_shards, split=split)]


def retrieval_input(settings: TokenizeSettings) -> str:
    return settings.retrieval_input or tc.retrieval_input_for(corpus_name(settings.corpus))


def tokenize(spec: dict) -> dict:
    """One shard: its lines' token ids and per-line lengths in one part."""
    def run(shard, work: stage.Work) -> dict:
        settings = work.settings()
        if not shard.items:
            raise VlprepError(f"{shard.marker}: an empty tokenization shard; replan with fewer shards")
        start, stop, byte_start = shard.items[0][0], shard.items[-1][1], shard.items[0][2]
        t0 = time.time()
        counts = tc.tokenize_range(settings.corpus, start, stop, shard.part(PART),
                                   tokenizer=load_tokenizer(settings.tokenizer),
                                   retrieval_input=retrieval_input(settings), byte_start=byte_start)
        return {"parts": [PART], "failed": [], **counts, "tokenize_seconds": round(time.time() - t0, 3)}

    return tokenize_stage(spec["name"]).run_shard(spec, run)


def tokenize_merge(out: str, name: str) -> dict:
    """Maria's three files of the tokens ``name`` (:func:`prefix_name`) from its shards in order."""
    work = tokenize_stage(name).open(out)
    recorded = work.settings()
    done = work.collect()
    prefix = storage.join(out, name)
    written = tc.merge_tokens([s.part(PART) for s, _ in done], prefix, drop_empty=recorded.drop_empty)
    lines = sum(m["lines"] for _, m in done)
    seconds = sum(m["tokenize_seconds"] for _, m in done)
    summary = {
        "tokens": prefix, "corpus": recorded.corpus, "tokenizer": recorded.tokenizer,
        "retrieval_input": retrieval_input(recorded), "lines": lines, "entries": written["entries"],
        "token_count": written["tokens"], "empty_lines": sum(m["empty"] for _, m in done),
        "dropped_lines": lines - written["entries"], "shards": len(done),
        "lines_per_second": round(lines / seconds, 1) if seconds else None,
    }
    storage.write_text(work.uri(SUMMARY), json.dumps(summary, indent=1))
    return summary


def read_summary(tokens: str) -> dict:
    """The merge summary of a tokens prefix (written by :func:`tokenize_merge`)."""
    folder, name = storage.parent(tokens), tokens.rstrip("/").rsplit("/", 1)[-1]
    uri = tokenize_stage(name).open(folder).uri(SUMMARY)
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise VlprepError(f"{uri}: no tokenization record for {tokens}; tokenize the corpus with `vlprep vokens "
                          "tokenize` (or pass --tokenizer for files tokenized elsewhere)") from None


def find_tokens(tokens: str) -> str:
    """The tokens prefix that ``tokens`` names: the prefix itself, or a folder holding exactly one."""
    tokens = str(tokens).rstrip("/")
    if storage.exists(tokens + ".line"):
        return tokens
    found = sorted(u[: -len(".line")] for u in storage.list_prefix(tokens)
                   if u.endswith(".line") and storage.parent(u) == tokens)
    if len(found) != 1:
        what = f"{len(found)} tokenized corpora ({', '.join(found)})" if found else "no tokenized corpus (*.line)"
        raise VlprepError(f"{tokens}: holds {what}; pass the tokens prefix {{dir}}/{{corpus}}.{{tokenizer}}")
    return found[0]
