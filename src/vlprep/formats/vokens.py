"""Maria's vokenization files: tokenized corpus, image keys, vokens.

**Tokens** (``tokenization/tokenize_dataset.py`` + ``to_hdf5.py``), for a corpus file ``{f}`` and tokenizer
name ``{tok}``, written under one prefix ``{f}.{tok}``:
- ``{f}.{tok}``: one line per entry, the token ids separated by single spaces;
- ``{f}.{tok}.line``: L+1 cumulative token offsets, one decimal per line (entry i is ``[o[i], o[i+1])``);
- ``{f}.{tok}.hdf5``: dataset ``tokens``, int32, 1-D, resizable (``maxshape=(None,)``, h5py's default
  chunks), grown in steps: upstream appends its buffer whenever it holds >= 1,000,000 tokens at a line end.
  Writing the same steps gives the same bytes.

**Keys** (``vokenization/extract_vision_keys.py``), in a keys folder, per image set ``{set}``:
- ``{set}.hdf5``: dataset ``keys``, (N, d) float32, contiguous, no compression, no attributes, rows
  L2-normalised by the model;
- ``{set}.path`` and ``{set}.ids``: the N images kept (failed loads skipped), one per line, row-aligned.

**Vokens** (``vokenization/vokenize_corpus_mp.py``): ``{corpus}.{sets joined by _}{.N unless N == 50000}``
holds one line per token entry: the basenames of the top-k image paths, tab-separated; its ``.ids``
sibling lists every key row as ``{set}/{id}`` (sets in sorted order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from vlprep import VlprepError, storage
from vlprep.formats import open_h5

TOKENS_DATASET = "tokens"
KEYS_DATASET = "keys"
UPSTREAM_FLUSH_TOKENS = 1_000_000  # to_hdf5's dump_interval
UPSTREAM_DEFAULT_IMAGES = 50_000  # the image count that gets no ".N" suffix in the vokens file name


# ---------------------------------------------------------------- tokens


def tokens_prefix(out_dir: str, corpus_name: str, tokenizer_name: str) -> str:
    return storage.join(out_dir, f"{corpus_name}.{tokenizer_name}")


def write_tokens(prefix: str, parts: Iterable[tuple[np.ndarray, np.ndarray]], *, ids_text: bool = True,
                 flush_tokens: int = UPSTREAM_FLUSH_TOKENS) -> dict:
    """Write ``{prefix}.hdf5``, ``{prefix}.line`` and (``ids_text``) the ids text ``{prefix}``.

    ``parts``: ``(lengths, tokens)`` pairs in order, each holding whole entries: tokens per entry and
    their int32 ids concatenated. The hdf5 grows exactly as upstream's (see the module docstring).
    """
    import h5py

    if flush_tokens < 1:
        raise VlprepError(f"flush_tokens must be >= 1 (got {flush_tokens})")
    all_lengths = []
    with storage.local_file_for(prefix + ".hdf5") as h5_path, _text_writer(prefix, ids_text) as text:
        with h5py.File(h5_path, "w") as f:
            grower = _UpstreamGrowth(f.create_dataset(TOKENS_DATASET, (0,), maxshape=(None,), dtype="int32"),
                                     flush_tokens)
            for lengths, tokens in parts:
                lengths, tokens = np.asarray(lengths, dtype=np.int64), np.asarray(tokens, dtype=np.int32)
                if int(lengths.sum()) != len(tokens):
                    raise VlprepError(f"{prefix}: a token part holds {len(tokens)} tokens but its lengths sum to "
                                      f"{int(lengths.sum())}; the part is corrupt, redo its shard")
                all_lengths.append(lengths)
                grower.add(lengths, tokens)
                if text is not None:
                    text.write(_ids_lines(lengths, tokens))
            grower.finish()
    lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    storage.write_text(prefix + ".line", "".join(f"{o}\n" for o in offsets.tolist()))
    return {"entries": int(len(lengths)), "tokens": int(offsets[-1])}


class _UpstreamGrowth:
    """Appends to a resizable 1-D dataset as ``to_hdf5`` does: buffer whole lines, write at the first line
    end where the buffer holds >= ``flush_tokens``, and the rest at the end."""

    def __init__(self, dset, flush_tokens: int):
        self.dset, self.flush_tokens = dset, flush_tokens
        self.written, self.pending, self.buffered = 0, [], 0

    def add(self, lengths: np.ndarray, tokens: np.ndarray) -> None:
        ends = np.cumsum(lengths)
        start, first = 0, 0
        while True:
            need = self.flush_tokens - self.buffered + start  # line end (in this part) that fills the buffer
            j = first + int(np.searchsorted(ends[first:], need, side="left"))
            if j >= len(ends):
                break
            end = int(ends[j])
            self.pending.append(tokens[start:end])
            self._write()
            start, first = end, j + 1
        self.pending.append(tokens[start:])
        self.buffered += len(tokens) - start

    def _write(self) -> None:
        buf = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int32)
        self.dset.resize((self.written + len(buf),))
        if len(buf):
            self.dset[self.written:self.written + len(buf)] = buf
        self.written += len(buf)
        self.pending, self.buffered = [], 0

    def finish(self) -> None:
        self._write()


def _text_writer(prefix: str, enabled: bool):
    import contextlib
    import io

    @contextlib.contextmanager
    def opened():
        with storage.open_write(prefix) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            yield text
            text.flush()
            text.detach()

    return opened() if enabled else contextlib.nullcontext(None)


def _ids_lines(lengths: np.ndarray, tokens: np.ndarray) -> str:
    ids = tokens.tolist()
    out, a = [], 0
    for n in lengths.tolist():
        out.append(" ".join(map(str, ids[a:a + n])) + "\n")
        a += n
    return "".join(out)


def read_offsets(prefix: str) -> np.ndarray:
    """The L+1 offsets of ``{prefix}.line`` (int64)."""
    try:
        text = storage.read_text(prefix + ".line")
    except FileNotFoundError:
        raise VlprepError(f"{prefix}.line: no such file; tokenize the corpus first") from None
    try:
        offsets = np.array([int(x) for x in text.split()], dtype=np.int64)
    except ValueError:
        raise VlprepError(f"{prefix}.line: not a list of integers; re-tokenize the corpus") from None
    if len(offsets) == 0 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
        raise VlprepError(f"{prefix}.line: offsets must start at 0 and never decrease; re-tokenize the corpus")
    return offsets


def read_token_lines(prefix: str, start: int, stop: int, offsets: np.ndarray | None = None) -> list[np.ndarray]:
    """Token ids (int32) of entries ``[start, stop)``, read with one slice of ``{prefix}.hdf5``."""

    offsets = read_offsets(prefix) if offsets is None else offsets
    if not 0 <= start <= stop <= len(offsets) - 1:
        raise VlprepError(f"{prefix}: entries [{start}, {stop}) are outside the {len(offsets) - 1} entries")
    a, b = int(offsets[start]), int(offsets[stop])
    with storage.local_copy(prefix + ".hdf5") as path, open_h5(path, "tokens HDF5", name=prefix + ".hdf5") as f:
        if TOKENS_DATASET not in f or f[TOKENS_DATASET].shape[0] != offsets[-1]:
            raise VlprepError(f"{prefix}.hdf5: dataset 'tokens' is missing or disagrees with {prefix}.line")
        flat = f[TOKENS_DATASET][a:b]
    cuts = (offsets[start:stop + 1] - a).tolist()
    return [flat[x:y] for x, y in zip(cuts[:-1], cuts[1:], strict=True)]


# ---------------------------------------------------------------- keys


def write_keys(keys_dir: str, image_set: str, keys: np.ndarray, paths: Sequence[str], ids: Sequence[str]) -> None:
    """``{set}.hdf5`` (``keys``, contiguous float32, as upstream lays it out), ``{set}.path``, ``{set}.ids``."""
    import h5py

    keys = np.asarray(keys, dtype=np.float32)
    if keys.ndim != 2 or not len(keys) == len(paths) == len(ids):
        raise VlprepError(f"{image_set}: {keys.shape} keys for {len(paths)} paths and {len(ids)} ids")
    with storage.local_file_for(storage.join(keys_dir, f"{image_set}.hdf5")) as h5_path:
        with h5py.File(h5_path, "w") as f:
            f.create_dataset(KEYS_DATASET, keys.shape, dtype="float32")[...] = keys
    storage.write_text(storage.join(keys_dir, f"{image_set}.path"), "".join(f"{p}\n" for p in paths))
    storage.write_text(storage.join(keys_dir, f"{image_set}.ids"), "".join(f"{i}\n" for i in ids))


def read_key_names(keys_dir: str, image_set: str) -> tuple[list[str], list[str]]:
    """(paths, ids) of one image set's key rows; without ``.path`` the ids stand in for paths, as upstream."""
    base = storage.join(keys_dir, image_set)
    try:
        ids = [i.strip() for i in storage.read_text(base + ".ids").splitlines()]
    except FileNotFoundError:
        raise VlprepError(f"{base}.ids: no such file; extract the keys of image set {image_set!r} first") from None
    paths = [p.strip() for p in storage.read_text(base + ".path").splitlines()] if storage.exists(base + ".path") else ids
    if len(paths) != len(ids):
        raise VlprepError(f"{base}: {len(ids)} ids but {len(paths)} paths; re-extract the keys")
    return paths, ids


def read_keys(keys_dir: str, image_set: str) -> tuple[np.ndarray, list[str], list[str]]:
    """(keys (N, d) float32, paths, ids) of one image set."""

    paths, ids = read_key_names(keys_dir, image_set)
    base = storage.join(keys_dir, image_set)
    try:
        with storage.local_copy(base + ".hdf5") as path, open_h5(path, "keys HDF5", name=base + ".hdf5") as f:
            keys = np.asarray(f[KEYS_DATASET][:], dtype=np.float32)
    except (FileNotFoundError, KeyError) as e:
        raise VlprepError(f"{base}.hdf5: no dataset 'keys' ({e}); extract the keys first") from None
    if len(keys) != len(ids):
        raise VlprepError(f"{base}: {len(keys)} keys for {len(ids)} ids; re-extract the keys")
    return keys, paths, ids


# ---------------------------------------------------------------- vokens


def vokens_name(corpus_name: str, image_sets: Sequence[str], num_images: int) -> str:
    """Maria's vokens file name, e.g. ``valid.pkl.txt.open_images.494159``."""
    suffix = "" if num_images == UPSTREAM_DEFAULT_IMAGES else f".{num_images}"
    return f"{corpus_name}.{'_'.join(sorted(image_sets))}{suffix}"


def write_vokens(uri: str, lines: Iterable[str], voken_ids: Sequence[str]) -> int:
    """The vokens file (``lines``: one per entry, without newline) and its ``.ids`` sibling; returns the line count."""
    count = 0
    with storage.open_write(uri) as f:
        for line in lines:
            f.write((line + "\n").encode("utf-8"))
            count += 1
    storage.write_text(uri + ".ids", "".join(f"{v}\n" for v in voken_ids))
    return count


def read_vokens(uri: str) -> list[list[str]]:
    """The image basenames of each line of a vokens file."""
    return [line.split("\t") for line in storage.read_text(uri).split("\n")[:-1]]
