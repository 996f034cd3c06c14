"""Line corpora for vokenization: read by line range, Maria's Reddit retrieval input, tokenize per shard.

**Lines** are what upstream's ``for line in open(f, 'rb')`` yields: split after each ``\\n`` only (a
``\\r``, ``\\x85`` or U+2028 stays inside its line); a last line without ``\\n`` counts; each line is
decoded as strict UTF-8 (upstream crashes on other bytes; here that is one error naming the line).

**Reddit** (Maria ``README.md``): one case a line, utterances tab-separated, the last one the response.
The retrieval input of a ``train`` line is the whole case (context + response); of ``valid``/``test``
the context only (the line without its last utterance, utterances rejoined with tabs, which the BERT
tokenizer reads as spaces). A one-utterance valid/test line has an empty context.

**Entries.** Upstream drops empty lines and lines that tokenize to nothing, so its outputs no longer
line up with the dialog file (the dialog model pairs them line by line). By default every input line
gives one entry here (an empty line is an empty span, which vokenization still answers, from
``[CLS] [SEP]``). ``drop_empty=True`` reproduces upstream's files byte for byte: a line that Python's
``strip()`` empties is never tokenized (an empty span), so upstream's two drop rules become the one
rule "no tokens".
Upstream's Wikipedia-only filters (paths containing ``wiki``) are not reproduced.

**Shards.** ``tokenize_range`` turns lines ``[start, stop)`` into one part (npz: ``lengths`` int64 per
line, ``tokens`` int32); ``merge_tokens`` concatenates parts in order into Maria's three files. The
result is identical for any number of shards.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import numpy as np

from vlprep import VlprepError, storage
from vlprep.formats import vokens as fmt
from vlprep.models.matching.tokenizer import encode_ids

RETRIEVAL_INPUTS = ("whole", "context")
_BLOCK = 1 << 20


def retrieval_input_for(corpus_name: str) -> str:
    """``context`` for Maria's valid/test files (``valid.pkl.txt``), ``whole`` for the rest (train)."""
    return "context" if corpus_name.split(".")[0] in ("valid", "test") else "whole"


def retrieval_text(line: str, retrieval_input: str) -> str:
    """The text to tokenize for one Reddit case line."""
    if retrieval_input == "whole":
        return line
    if retrieval_input == "context":
        return "\t".join(line.rstrip("\n").split("\t")[:-1])
    raise VlprepError(f"retrieval_input {retrieval_input!r}: use one of {', '.join(RETRIEVAL_INPUTS)}")


def _open(uri: str):
    try:
        return storage.open_read(uri)
    except FileNotFoundError:
        raise VlprepError(f"{uri}: no such corpus file") from None


def count_lines(uri: str) -> int:
    """Number of lines (as upstream iterates them)."""
    count, last = 0, b"\n"
    with _open(uri) as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def byte_offsets(uri: str, line_numbers: Sequence[int]) -> list[int]:
    """The byte offset where each of ``line_numbers`` starts (one pass; for seeking to a shard's first line)."""
    wanted = np.array(sorted(set(int(n) for n in line_numbers)), dtype=np.int64)
    found: dict[int, int] = {0: 0}
    line, pos = 0, 0
    with _open(uri) as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            numbers = line + 1 + np.arange(len(ends))
            hit = np.isin(numbers, wanted)
            found.update(zip(numbers[hit].tolist(), (pos + ends[hit] + 1).tolist(), strict=True))
            line, pos = line + len(ends), pos + len(block)
    missing = [n for n in wanted.tolist() if n not in found]
    if missing:
        raise VlprepError(f"{uri}: has no line {missing[0]} (it has {line} complete lines)")
    return [found[int(n)] for n in line_numbers]


def iter_lines(uri: str, start: int, stop: int, *, byte_start: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its ``\\n``) for lines ``[start, stop)``.

    ``byte_start``: the byte offset of line ``start`` (from :func:`byte_offsets`), to seek instead of scan.
    """
    with _open(uri) as raw:
        if byte_start is not None:
            raw.seek(byte_start)
            n = start
        else:
            n = 0
        for data in raw:  # binary line iteration splits after b"\n" only, as upstream's
            if n >= stop:
                return
            if n >= start:
                try:
                    yield n, data.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise VlprepError(f"{uri}: line {n + 1} is not UTF-8 ({e}); fix or re-encode the corpus") from None
            n += 1
    if n < stop:
        raise VlprepError(f"{uri}: lines [{start}, {stop}) asked for, the file has {n}")


def tokenize_range(uri: str, start: int, stop: int, part_uri: str, *, tokenizer, retrieval_input: str = "whole",
                   byte_start: int | None = None, batch_lines: int = 8192) -> dict:
    """Tokenize lines ``[start, stop)`` of a corpus into one part (``.npz``) at ``part_uri``.

    ``tokenizer``: from ``vlprep.models.matching.tokenizer.load_tokenizer``. Returns counts.
    """
    lengths: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    batch: list[str] = []

    def flush():
        ids = encode_ids(tokenizer, batch)
        lengths.append(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
        tokens.extend(ids)
        batch.clear()

    for _, line in iter_lines(uri, start, stop, byte_start=byte_start):
        text = retrieval_text(line, retrieval_input)
        batch.append(text if text.strip() else "")  # upstream never tokenizes a line that strip() empties
        if len(batch) >= batch_lines:
            flush()
    if batch:
        flush()
    length = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    flat = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
    buf = io.BytesIO()
    np.savez(buf, lengths=length, tokens=flat.astype(np.int32, copy=False))
    storage.write_bytes(part_uri, buf.getvalue())
    return {"lines": int(len(length)), "tokens": int(len(flat)), "empty": int((length == 0).sum())}


def read_token_part(part_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, tokens) of one part."""
    with np.load(io.BytesIO(storage.read_bytes(part_uri)), allow_pickle=False) as z:
        return z["lengths"], z["tokens"]


def _kept_parts(part_uris: Sequence[str], drop_empty: bool):
    for uri in part_uris:
        lengths, tokens = read_token_part(uri)
        yield (lengths[lengths > 0], tokens) if drop_empty else (lengths, tokens)


def merge_tokens(part_uris: Sequence[str], prefix: str, *, drop_empty: bool = False, ids_text: bool = True,
                 flush_tokens: int = fmt.UPSTREAM_FLUSH_TOKENS) -> dict:
    """Concatenate token parts in order into ``{prefix}.hdf5``, ``{prefix}.line`` and the ids text ``{prefix}``.

    ``prefix`` is ``{out}/{corpus file name}.{tokenizer name}`` (``formats.vokens.tokens_prefix``).
    ``drop_empty``: drop entries without tokens, as upstream does (byte-identical to upstream's files).
    """
    return fmt.write_tokens(prefix, _kept_parts(part_uris, drop_empty), ids_text=ids_text, flush_tokens=flush_tokens)
