"""Vokenization (Maria's ``vokenization/vokenization.py`` + ``vokenize_corpus_mp.py``), per line range.

For each entry of a tokenized corpus (``formats.vokens`` tokens files):
1. the ids get Maria's over-length rule: a line of n > 128 ids is cut into ``ceil(n / 128)`` segments of
   ``int(n / segments)`` ids (the remainder forms further segments); Maria keeps only the **first**
   segment's result, so only the first segment is computed here (the others never reached the output);
2. the query is ``[CLS] ids [SEP]``, right-padded with ``[PAD]`` (0) to the longest in its page, with
   attention mask ``ids != [PAD]`` (so a literal ``[PAD]`` token in the text is masked, as upstream);
3. the sentence embedding (unit vector) is searched exactly against the keys of the image sets:
   faiss ``IndexFlatIP`` (upstream: ``IndexFlatL2``; on unit vectors both give the same ranking), on
   all GPUs when faiss-gpu sees any;
4. the top 5 rows become one output line: the basenames of their ``.path`` entries, tab-separated.

Pages of 512 entries (upstream's page) are aligned to multiples of 512 in the whole corpus, so a shard
whose bounds are multiples of the page size computes exactly the batches a single run does; other
bounds change only the padding of one page (float rounding, ~1e-6 on embeddings).

Image sets are concatenated in sorted name order (upstream sorts them), optionally cut to
``max_images`` rows; voken ids are ``{set}/{id}``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import torch

from vlprep import VlprepError, storage
from vlprep.formats import vokens as fmt
from vlprep.progress import Progress

UPPER_BOUND = 128
TOPK = 5
PAGE_LINES = 512


def first_segment(ids: np.ndarray, upper_bound: int = UPPER_BOUND) -> np.ndarray:
    """The first of Maria's near-equal segments of an over-length line (the whole line otherwise)."""
    n = len(ids)
    if n <= upper_bound:
        return ids
    return ids[: int(n / math.ceil(n / upper_bound))]


def query_batch(lines: Sequence[np.ndarray], *, cls_id: int, sep_id: int, pad_id: int,
                upper_bound: int = UPPER_BOUND) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (B, L) for entries' token ids, as the vokenizer builds them."""
    seqs = [np.concatenate([[cls_id], first_segment(ids, upper_bound), [sep_id]]) for ids in lines]
    out = np.full((len(seqs), max(map(len, seqs), default=0)), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    ids = torch.from_numpy(out)
    return ids, ids != pad_id


@dataclass
class KeySets:
    """The concatenated keys of image sets, their paths and voken ids, and an exact inner-product index."""

    sets: tuple[str, ...]
    paths: list[str]
    voken_ids: list[str]
    keys: np.ndarray | None = None
    index: object = field(default=None, repr=False)

    def search(self, queries: np.ndarray, k: int = TOPK) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            raise VlprepError("these key sets were loaded without keys; load them with with_keys=True")
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), int(k))
        if (rows < 0).any():
            raise VlprepError(f"fewer than {k} images in the key sets {', '.join(self.sets)}; use a smaller top-k")
        return scores, rows


def _faiss_gpus(faiss) -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def load_key_sets(keys_dir: str, image_sets: Sequence[str], *, max_images: int = -1, with_keys: bool = True,
                  use_gpu: bool | None = None) -> KeySets:
    """Key rows of the sorted ``image_sets`` (the first ``max_images``; -1 all), indexed when ``with_keys``."""
    sets = tuple(sorted(s.strip() for s in image_sets))
    limit = math.inf if max_images == -1 else max_images
    paths, voken_ids, keys = [], [], []
    for name in sets:
        room = limit - len(paths)
        if room <= 0:
            break
        if with_keys:
            set_keys, set_paths, set_ids = fmt.read_keys(keys_dir, name)
            keys.append(set_keys[: int(min(room, len(set_keys)))])
        else:
            set_paths, set_ids = fmt.read_key_names(keys_dir, name)
        take = int(min(room, len(set_ids)))
        paths += set_paths[:take]
        voken_ids += [f"{name}/{i}" for i in set_ids[:take]]
    out = KeySets(sets, paths, voken_ids)
    if with_keys:
        import faiss

        out.keys = np.ascontiguousarray(np.concatenate(keys), dtype=np.float32)
        index = faiss.IndexFlatIP(out.keys.shape[1])
        if (use_gpu is None or use_gpu) and _faiss_gpus(faiss):
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(out.keys)
        out.index = index
    return out


def _pages(start: int, stop: int, page: int) -> Iterator[tuple[int, int]]:
    a = start
    while a < stop:
        b = min(stop, (a // page + 1) * page)
        yield a, b
        a = b


@dataclass
class Vokenizer:
    """What vokenization needs: the sentence tower (eval mode, on its device), the tokenizer's special ids
    and the key sets; ``topk`` results per entry, computed in pages of ``page_lines`` entries."""

    lang_model: torch.nn.Module
    tokenizer: object
    key_sets: KeySets
    topk: int = TOPK
    page_lines: int = PAGE_LINES

    def search_lines(self, lines: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) (n, topk) of token lines, in one batch."""
        tok = self.tokenizer
        ids, mask = query_batch(lines, cls_id=tok.cls_token_id, sep_id=tok.sep_token_id, pad_id=tok.pad_token_id)
        device = next(self.lang_model.parameters()).device
        with torch.inference_mode():
            queries = self.lang_model(ids.to(device), mask.to(device)).float().cpu().numpy()
        return self.key_sets.search(queries, self.topk)


def vokenize_range(tokens_prefix: str, start: int, stop: int, part_uri: str, vokenizer: Vokenizer) -> dict:
    """Top-k key rows of entries ``[start, stop)`` into one part (npz: ``rows`` int64, ``scores`` float32)."""
    offsets = fmt.read_offsets(tokens_prefix)
    lines = fmt.read_token_lines(tokens_prefix, start, stop, offsets)
    rows, scores = [np.zeros((0, vokenizer.topk), np.int64)], [np.zeros((0, vokenizer.topk), np.float32)]
    with Progress(f"vokenize [{start}, {stop})", total=stop - start, unit="lines") as bar:
        for a, b in _pages(start, stop, vokenizer.page_lines):
            s, r = vokenizer.search_lines(lines[a - start: b - start])
            rows.append(r)
            scores.append(s)
            bar.advance(b - a)
    buf = io.BytesIO()
    np.savez(buf, rows=np.concatenate(rows), scores=np.concatenate(scores))
    storage.write_bytes(part_uri, buf.getvalue())
    return {"lines": stop - start, "segmented": sum(len(x) > UPPER_BOUND for x in lines)}


def read_voken_part(part_uri: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(part_uri)), allow_pickle=False) as z:
        return z["rows"], z["scores"]


def merge_vokens(part_uris: Sequence[str], out_dir: str, corpus_name: str, key_sets: KeySets) -> dict:
    """Maria's vokens file ``{out_dir}/{vokens_name}`` and its ``.ids`` from parts in order."""
    basenames = [PurePosixPath(p).name for p in key_sets.paths]
    name = fmt.vokens_name(corpus_name, key_sets.sets, len(key_sets.paths))

    def lines():
        for uri in part_uris:
            for row in read_voken_part(uri)[0].tolist():
                yield "\t".join(basenames[j] for j in row)

    uri = storage.join(out_dir, name)
    count = fmt.write_vokens(uri, lines(), key_sets.voken_ids)
    return {"vokens": uri, "lines": count, "images": len(key_sets.paths)}
