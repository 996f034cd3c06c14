"""Vokenization pieces vs their baselines, measured in the same run on the same inputs (tiny model, CPU).

The ``vlprep`` side of each is the stage's steps as ``vlprep vokens tokenize | vokenize | keys`` run them
(``vlprep.stages.vokens``: plan, shards with their done-markers, merge).

1. Tokenization, lines/s. Baseline ``upstream``: Maria's ``tokenize_dataset.py`` + ``to_hdf5.py`` loop
   restated (bytes -> one ``convert_tokens_to_ids(tokenize(line))`` call per line -> ids text ->
   re-read -> hdf5). ``vlprep``: ``tokenize_steps`` (4 shards, batched Rust tokenizer) with
   ``drop_empty``; the three files are checked byte-identical to the baseline's.
2. Vokenization, lines/s. Baseline ``bare``: pages of 512 token lines from the hdf5 -> ``[CLS] ids [SEP]``
   padded -> the sentence tower -> ``faiss.IndexFlatIP.search`` top-5 -> basenames written.
   ``vlprep``: ``vokenize_steps`` (2 shards; the same work plus hashing the inputs at plan, reading
   ``.line``, parts in the store, the ``.ids`` file and the report); outputs checked identical.
3. Image keys, images/s. Baseline ``upstream``: ``extract_vision_keys.py``'s loop restated (sequential
   ``default_loader`` (PIL open + convert RGB) + transform, batches of the model). ``vlprep``:
   ``keys_steps`` (one shard, DataLoader workers).

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

from vlprep import stage
from vlprep.formats import vokens as fmt
from vlprep.models.matching import keys as mk
from vlprep.models.matching import vokenize as vk
from vlprep.models.matching.config import TINY
from vlprep.models.matching.images import eval_transform
from vlprep.models.matching.tokenizer import load_tokenizer, tokenizer_label
from vlprep.sample import sample_dir
from vlprep.stages import vokens as V
from vlprep.stages.vokens.keys import matcher_for

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


def bench_tokenize(tmp: Path, spec: str, n: int) -> str:
    tok, label = load_tokenizer(spec), tokenizer_label(spec)
    up = tmp / "up" / "train.pkl.txt"
    up.parent.mkdir()
    make_corpus(up, n)
    t = time.perf_counter()
    upstream_tokenize(up, tok, label)
    base = time.perf_counter() - t
    ours_dir = tmp / "ours"
    settings = V.TokenizeSettings(corpus=str(up), tokenizer=spec, drop_empty=True, block_lines=-(-n // 4))
    t = time.perf_counter()
    summary = V.run_steps("bench", V.tokenize_steps(str(ours_dir), settings, num_shards=4))
    ours = time.perf_counter() - t
    prefix = summary["tokens"]
    same = all(Path(prefix + s).read_bytes() == Path(f"{up}.{label}{s}").read_bytes() for s in ("", ".line", ".hdf5"))
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


def bench_vokenize(tmp: Path, prefix: str, spec: str, n_keys: int, n_lines: int) -> None:
    model, tok = matcher_for("random:0", "tiny", "cpu"), load_tokenizer(spec)  # the stage's cached matcher
    rs = np.random.RandomState(1)
    keys = rs.standard_normal((n_keys, TINY.dim)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    ids = [f"{i:016x}" for i in range(n_keys)]
    keys_dir = tmp / "keys"
    fmt.write_keys(str(keys_dir), "open_images", keys, [f"data/open_images/images/{i}.jpg" for i in ids], ids)
    offsets = fmt.read_offsets(prefix)
    n_lines = min(n_lines, len(offsets) - 1)
    small = str(tmp / "vk" / f"corpus.txt.{tokenizer_label(spec)}")
    lines = fmt.read_token_lines(prefix, 0, n_lines, offsets)
    fmt.write_tokens(small, [(np.array([len(x) for x in lines]), np.concatenate(lines))])
    names = [f"{i}.jpg" for i in ids]
    t = time.perf_counter()
    bare_vokenize(small, model.lang_model, tok, keys, names, tmp / "bare.txt")
    base = time.perf_counter() - t
    settings = V.make_settings(tokens=small, keys=str(keys_dir), matcher="random:0", config="tiny", tokenizer=spec)
    t = time.perf_counter()
    out = V.run_steps("bench", V.vokenize_steps(str(tmp / "vk"), lambda: settings, num_shards=2,
                                                runtime=stage.Runtime(device="cpu")))
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


def bench_keys(tmp: Path, n: int, workers: int) -> None:
    model = matcher_for("random:0", "tiny", "cpu")
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
    settings = V.KeySettings(images=str(folder), image_set="open_images", matcher="random:0", config="tiny",
                             batch_size=32)
    for w in sorted({0, workers}):
        out = str(tmp / f"keys-out-{w}")
        t = time.perf_counter()
        V.run_steps("bench", V.keys_steps(out, settings, runtime=stage.Runtime(device="cpu", num_workers=w)))
        ours = time.perf_counter() - t
        same = np.allclose(fmt.read_keys(out, "open_images")[0], base_keys, atol=1e-5)
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
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prefix = bench_tokenize(tmp, args.tokenizer, args.lines)
        bench_vokenize(tmp, prefix, args.tokenizer, args.keys, args.vokenize_lines)
        bench_keys(tmp, args.images, args.workers)


if __name__ == "__main__":
    main()
