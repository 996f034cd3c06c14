"""Vokenization pieces vs their baselines, measured in the same run on the same inputs (tiny model, CPU).

1. Tokenization, lines/s. Baseline ``upstream``: Maria's ``tokenize_dataset.py`` + ``to_hdf5.py`` loop
   restated (bytes -> one ``convert_tokens_to_ids(tokenize(line))`` call per line -> ids text ->
   re-read -> hdf5). ``vlprep``: ``text_corpus.tokenize_range`` (batched Rust tokenizer) per shard and
   ``merge_tokens(drop_empty=True)``; the three files are checked byte-identical to the baseline's.
2. Vokenization, lines/s. Baseline ``bare``: pages of 512 token lines from the hdf5 -> ``[CLS] ids [SEP]``
   padded -> the sentence tower -> ``faiss.IndexFlatIP.search`` top-5 -> basenames written.
   ``vlprep``: ``vokenize_range`` + ``merge_vokens`` (the same work plus reading ``.line``, parts in the
   store, the ``.ids`` file); outputs checked identical.
3. Image keys, images/s. Baseline ``upstream``: ``extract_vision_keys.py``'s loop restated (sequential
   ``default_loader`` (PIL open + convert RGB) + transform, batches of the model). ``vlprep``: ``extract_keys`` (DataLoader workers) +
   ``merge_keys``.

Weights are random and tiny (throughput of the plumbing, not of BERT-base). Ratios are vlprep / baseline
throughput (higher is better). Usage:
python bench/bench_vokens.py [--lines 20000] [--vokenize-lines 4096] [--keys 20000] [--images 96] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from vlprep.cli import sample_dir
from vlprep.data import text_corpus as tc
from vlprep.formats import vokens as fmt
from vlprep.models.matching import keys as mk
from vlprep.models.matching import vokenize as vk
from vlprep.models.matching.config import TINY
from vlprep.models.matching.images import eval_transform
from vlprep.models.matching.model import load_matcher
from vlprep.models.matching.tokenizer import load_tokenizer

SHARED_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "maria" / "bert-base-uncased"
WORDS = ("i think the movie was great but the ending was weird , what do you think ? lol yes "
         "my dog loves the beach and we went there yesterday . caf\u00e9 na\u00efve 2021 http://x.co").split()


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    rs = np.random.RandomState(seed)
    lines = []
    for i in range(n):
        utterances = ["" if i % 97 == 0 else " ".join(rs.choice(WORDS, rs.randint(3, 30))) for _ in range(3)]
        lines.append("\t".join(utterances) if i % 97 else "")
    path.write_text("\n".join(lines) + "\n")


def upstream_tokenize(corpus: Path, tok, label: str) -> None:
    cache, count, starts = [], 0, []
    with open(corpus, "rb") as f:
        for line in f:
            line = line.decode()
            if len(line.strip()) == 0:
                continue
            ids = tok.convert_tokens_to_ids(tok.tokenize(line))
            if not ids:
                continue
            starts.append(count)
            count += len(ids)
            cache.append(" ".join(map(str, ids)) + "\n")
    starts.append(count)
    Path(f"{corpus}.{label}").write_text("".join(cache))
    Path(f"{corpus}.{label}.line").write_text("".join(f"{s}\n" for s in starts))
    with h5py.File(f"{corpus}.{label}.hdf5", "w") as h5:
        dset = h5.create_dataset("tokens", (0,), maxshape=(None,), dtype="int32")
        done, tokens = 0, []
        for line in open(f"{corpus}.{label}"):
            tokens.extend(map(int, line.split(" ")))
            if len(tokens) >= fmt.UPSTREAM_FLUSH_TOKENS:
                dset.resize((done + len(tokens),))
                dset[done:done + len(tokens)] = tokens
                done, tokens = done + len(tokens), []
        dset.resize((done + len(tokens),))
        dset[done:done + len(tokens)] = tokens


def bench_tokenize(tmp: Path, tok, n: int) -> str:
    up = tmp / "up" / "train.pkl.txt"
    up.parent.mkdir()
    make_corpus(up, n)
    t = time.perf_counter()
    upstream_tokenize(up, tok, "tok")
    base = time.perf_counter() - t
    ours_dir = tmp / "ours"
    t = time.perf_counter()
    bounds = np.linspace(0, tc.count_lines(str(up)), 5).astype(int)
    starts = tc.byte_offsets(str(up), bounds[:-1])
    parts = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        parts.append(str(ours_dir / f"part{i}.npz"))
        tc.tokenize_range(str(up), int(a), int(b), parts[-1], tokenizer=tok, byte_start=starts[i])
    prefix = fmt.tokens_prefix(str(ours_dir), up.name, "tok")
    tc.merge_tokens(parts, prefix, drop_empty=True)
    ours = time.perf_counter() - t
    same = all(Path(prefix + s).read_bytes() == Path(f"{up}.tok{s}").read_bytes() for s in ("", ".line", ".hdf5"))
    print(f"tokenize  upstream per-line loop (baseline) {n / base:9.0f} lines/s")
    print(f"tokenize  vlprep, 4 shards + merge          {n / ours:9.0f} lines/s  ratio {base / ours:5.2f}  "
          f"identical files: {same}")
    return prefix


def bare_vokenize(prefix: str, model, tok, keys: np.ndarray, names: list[str], out: Path) -> None:
    import faiss

    offsets = [int(x) for x in Path(prefix + ".line").read_text().split()]
    with h5py.File(prefix + ".hdf5") as f:
        tokens = f["tokens"][:]
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys)
    lines = []
    for a in range(0, len(offsets) - 1, vk.PAGE_LINES):
        b = min(a + vk.PAGE_LINES, len(offsets) - 1)
        seqs = [[tok.cls_token_id, *vk.first_segment(tokens[offsets[i]:offsets[i + 1]]).tolist(), tok.sep_token_id]
                for i in range(a, b)]
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        with torch.inference_mode():
            q = model(ids, ids != 0).numpy()
        _, rows = index.search(q, vk.TOPK)
        lines += ["\t".join(names[j] for j in r) + "\n" for r in rows.tolist()]
    out.write_text("".join(lines))


def bench_vokenize(tmp: Path, prefix: str, model, tok, n_keys: int, n_lines: int) -> None:
    rs = np.random.RandomState(1)
    keys = rs.standard_normal((n_keys, TINY.dim)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    ids = [f"{i:016x}" for i in range(n_keys)]
    keys_dir = tmp / "keys"
    fmt.write_keys(str(keys_dir), "open_images", keys, [f"data/open_images/images/{i}.jpg" for i in ids], ids)
    offsets = fmt.read_offsets(prefix)
    n_lines = min(n_lines, len(offsets) - 1)
    small = str(tmp / "vk" / "corpus.txt.tok")
    lines = fmt.read_token_lines(prefix, 0, n_lines, offsets)
    fmt.write_tokens(small, [(np.array([len(x) for x in lines]), np.concatenate(lines))])
    names = [f"{i}.jpg" for i in ids]
    t = time.perf_counter()
    bare_vokenize(small, model.lang_model, tok, keys, names, tmp / "bare.txt")
    base = time.perf_counter() - t
    t = time.perf_counter()
    key_sets = vk.load_key_sets(str(keys_dir), ["open_images"])
    half = (n_lines // 2 // vk.PAGE_LINES) * vk.PAGE_LINES
    parts = []
    for i, (a, b) in enumerate(((0, half), (half, n_lines))):
        parts.append(str(tmp / "vk" / f"part{i}.npz"))
        vk.vokenize_range(small, a, b, parts[-1], vk.Vokenizer(model.lang_model, tok, key_sets))
    out = vk.merge_vokens(parts, str(tmp / "vk"), "corpus.txt", key_sets)
    ours = time.perf_counter() - t
    same = Path(out["vokens"]).read_text() == (tmp / "bare.txt").read_text()
    print(f"vokenize  bare BERT + faiss loop (baseline) {n_lines / base:9.0f} lines/s  ({n_keys} keys)")
    print(f"vokenize  vlprep, 2 shards + merge          {n_lines / ours:9.0f} lines/s  ratio {base / ours:5.2f}  "
          f"identical vokens: {same}")


def upstream_keys(model, uris: list[str], batch: int) -> np.ndarray:
    from PIL import Image

    transform, out, pending = eval_transform(TINY), [], []
    for uri in uris:
        with open(uri, "rb") as f:  # torchvision's default_loader
            pending.append(transform(Image.open(f).convert("RGB")))
        if len(pending) == batch:
            with torch.no_grad():
                out.append(model(torch.stack(pending)).numpy())
            pending = []
    if pending:
        with torch.no_grad():
            out.append(model(torch.stack(pending)).numpy())
    return np.concatenate(out)


def bench_keys(tmp: Path, model, n: int, workers: int) -> None:
    photos = sorted(Path(sample_dir(), "images").rglob("*.jpg"))
    folder = tmp / "images"
    folder.mkdir()
    for i in range(n):
        shutil.copy(photos[i % len(photos)], folder / f"{i:016x}.jpg")
    image_set = mk.image_set_from_folder("open_images", str(folder))
    t = time.perf_counter()
    base_keys = upstream_keys(model.visn_model, image_set.uris, 32)
    base = time.perf_counter() - t
    print(f"keys      upstream sequential loop (baseline) {n / base:7.1f} images/s")
    for w in sorted({0, workers}):
        t = time.perf_counter()
        part = str(tmp / f"keys-part-{w}.npz")
        mk.extract_keys(model.visn_model, image_set, 0, n, part, transform=eval_transform(TINY), batch_size=32,
                        num_workers=w)
        mk.merge_keys([part], str(tmp / f"keys-out-{w}"), "open_images")
        ours = time.perf_counter() - t
        same = np.allclose(fmt.read_keys(str(tmp / f"keys-out-{w}"), "open_images")[0], base_keys, atol=1e-5)
        print(f"keys      vlprep, {w} loader workers          {n / ours:7.1f} images/s  ratio {base / ours:5.2f}  "
              f"same keys: {same}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=20000)
    ap.add_argument("--vokenize-lines", type=int, default=4096)
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer", default=str(SHARED_TOKENIZER), help="bert-base-uncased name or folder")
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    model = load_matcher("random:0", TINY)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prefix = bench_tokenize(tmp, tok, args.lines)
        bench_vokenize(tmp, prefix, model, tok, args.keys, args.vokenize_lines)
        bench_keys(tmp, model, args.images, args.workers)


if __name__ == "__main__":
    main()
