"""Vokenization pieces on tiny models: corpus tokenization, image keys, vokens, and their files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from matching_data import COLORS, SHAPES, shape_image, write_vocab

from vlprep import VlprepError
from vlprep.data import text_corpus as tc
from vlprep.formats import vokens as fmt
from vlprep.models.matching import keys as mk
from vlprep.models.matching import vokenize as vk
from vlprep.models.matching.config import TINY
from vlprep.models.matching.images import eval_transform
from vlprep.models.matching.model import load_matcher
from vlprep.models.matching.tokenizer import encode_ids, load_tokenizer, tokenizer_label

# Lines chosen to stress the tokenizer and upstream's drop rules: BOM, tabs, CRLF, special-token text,
# accents, CJK, emoji, control characters, whitespace-only and empty lines, a zero-token line (BOM only),
# an over-length line, and a last line without a newline.
CORPUS = (
    "\ufeffhi there, how are you?\ti'm fine thanks\tgreat to hear!\n"
    "a red circle on a white background\n"
    "\n"
    "   \t  \n"
    "\u2028\u3000\x0b\xa0\x1c\n"
    "hello [SEP] world [CLS] [MASK] [UNK] [sep] [PAD] end\n"
    "Caf\u00e9 na\u00efve \u00c9COLE \u4f60\u597d\u4e16\u754c \U0001f600 ok\r\n"
    "\ufeff\n"
    "\x00\x01 control\x7f chars\x1f here\n"
    + " ".join(f"{c} {s}" for c in COLORS for s in SHAPES) * 3 + "\n"
    "a\u2028line\x85with odd separators\n"
    "the last line has no newline"
)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    return write_vocab(tmp_path_factory.mktemp("vocab") / "tiny-vocab")


@pytest.fixture(scope="module", params=["generated", "bert-base-uncased"])
def tokenizer(request, vocab_dir):
    if request.param == "generated":
        return load_tokenizer(str(vocab_dir))
    shared = request.getfixturevalue("shared")
    return load_tokenizer(str(shared / "fixtures" / "maria" / "bert-base-uncased"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "valid.pkl.txt"
    path.write_bytes(CORPUS.encode("utf-8"))
    return path


# ---------------------------------------------------------------- upstream, restated


def upstream_tokenize(corpus: Path, tokenizer, label: str, dump_interval: int) -> Path:
    """Maria's tokenize_dataset.py + to_hdf5.py loops (Reddit path, no wiki filters), one call per line."""
    cache, token_cnt, line_starts = "", 0, []
    with open(corpus, "rb") as f:
        for line in f:
            line = line.decode()
            if len(line.strip()) == 0:
                continue
            ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(line))
            if len(ids) == 0:
                continue
            line_starts.append(token_cnt)
            token_cnt += len(ids)
            cache += " ".join(map(str, ids)) + "\n"
    line_starts.append(token_cnt)
    prefix = Path(f"{corpus}.{label}")
    prefix.write_text(cache)
    with open(f"{prefix}.line", "w") as g:
        for s in line_starts:
            g.write(str(s) + "\n")
    h5 = h5py.File(f"{prefix}.hdf5", "w")
    dset = h5.create_dataset("tokens", (0,), maxshape=(None,), dtype="int32")
    dump_iter, tokens = 0, []
    with open(prefix) as f:
        for line in f:
            tokens.extend(map(int, line.split(" ")))
            if len(tokens) >= dump_interval:
                dset.resize((dump_iter + len(tokens),))
                dset[dump_iter: dump_iter + len(tokens)] = tokens
                dump_iter += len(tokens)
                tokens = []
    dset.resize((dump_iter + len(tokens),))
    dset[dump_iter: dump_iter + len(tokens)] = tokens
    h5.close()
    return prefix


def tokenize_sharded(corpus: Path, out: Path, tokenizer, shards: int, **merge_args) -> str:
    total = tc.count_lines(str(corpus))
    bounds = np.linspace(0, total, shards + 1).astype(int)
    offsets = tc.byte_offsets(str(corpus), bounds[:-1])
    parts = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = str(out / "parts" / f"tokens-{shards}-{i}.npz")
        tc.tokenize_range(str(corpus), int(a), int(b), part, tokenizer=tokenizer, byte_start=offsets[i], batch_lines=3)
        parts.append(part)
    prefix = fmt.tokens_prefix(str(out / f"s{shards}"), corpus.name, "tok")
    tc.merge_tokens(parts, prefix, **merge_args)
    return prefix


# ---------------------------------------------------------------- tokenization


def test_batched_ids_equal_upstream_per_line_calls(tokenizer):
    lines = CORPUS.encode().split(b"\n")
    texts = [line.decode() + "\n" for line in lines]
    want = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(t)) for t in texts]
    got = encode_ids(tokenizer, texts)
    assert [g.tolist() for g in got] == want
    assert all(g.dtype == np.int32 for g in got)
    assert any(len(w) == 0 for w in want) and max(map(len, want)) > 128


@pytest.mark.parametrize("shards", [1, 2, 5, 12])
def test_drop_empty_reproduces_upstream_files_byte_for_byte(tokenizer, corpus, tmp_path, shards):
    flush = 9  # upstream's 1,000,000, small so that the hdf5 grows in several steps here
    want = upstream_tokenize(corpus, tokenizer, "tok", flush)
    got = tokenize_sharded(corpus, tmp_path, tokenizer, shards, drop_empty=True, flush_tokens=flush)
    for suffix in ("", ".line", ".hdf5"):
        assert Path(got + suffix).read_bytes() == Path(f"{want}{suffix}").read_bytes(), suffix


def test_default_keeps_one_entry_per_line(tokenizer, corpus, tmp_path):
    prefix = tokenize_sharded(corpus, tmp_path, tokenizer, 3)
    offsets = fmt.read_offsets(prefix)
    raw_lines = CORPUS.encode().split(b"\n")
    assert len(offsets) == len(raw_lines) + 1 == tc.count_lines(str(corpus)) + 1
    entries = fmt.read_token_lines(prefix, 0, len(raw_lines))
    for raw, ids in zip(raw_lines, entries, strict=True):
        assert ids.tolist() == tokenizer.convert_tokens_to_ids(tokenizer.tokenize(raw.decode()))
    assert [len(e) for e in entries][2:4] == [0, 0]
    text_lines = Path(prefix).read_text().split("\n")[:-1]
    assert text_lines[2] == "" and len(text_lines) == len(raw_lines)
    with h5py.File(prefix + ".hdf5") as f:
        assert f["tokens"].dtype == np.int32 and f["tokens"].shape == (offsets[-1],)


def test_merge_is_identical_for_any_shard_count(tokenizer, corpus, tmp_path):
    digests = set()
    for shards in (1, 4, 11):
        prefix = tokenize_sharded(corpus, tmp_path, tokenizer, shards)
        digests.add(tuple(hashlib.sha256(Path(prefix + s).read_bytes()).hexdigest() for s in ("", ".line", ".hdf5")))
    assert len(digests) == 1


def test_reddit_valid_and_test_keep_the_context_only(vocab_dir, tmp_path):
    tok = load_tokenizer(str(vocab_dir))
    corpus = tmp_path / "test.pkl.txt"
    corpus.write_text("hello world\thow are you\ti am fine\nhello\n")
    assert tc.retrieval_input_for(corpus.name) == "context"
    assert tc.retrieval_input_for("train.pkl.txt") == "whole"
    part = str(tmp_path / "p.npz")
    tc.tokenize_range(str(corpus), 0, 2, part, tokenizer=tok, retrieval_input="context")
    lengths, tokens = tc.read_token_part(part)
    want = encode_ids(tok, ["hello world how are you", ""])
    assert lengths.tolist() == [len(w) for w in want] and lengths[1] == 0
    assert tokens.tolist() == np.concatenate(want).tolist()
    tc.tokenize_range(str(corpus), 0, 2, part, tokenizer=tok, retrieval_input="whole")
    assert tc.read_token_part(part)[0][0] == len(encode_ids(tok, ["hello world how are you i am fine"])[0])


def test_line_counting_and_seeking(tmp_path):
    path = tmp_path / "c.txt"
    for data, lines in ((b"", 0), (b"a", 1), (b"a\n", 1), (b"a\n\nb", 3), (b"\n\n", 2), (b"x\ry\n", 1)):
        path.write_bytes(data)
        assert tc.count_lines(str(path)) == lines, data
    path.write_bytes(b"zero\none\r\ntwo\xc2\x85still two\n\nfour")
    offsets = tc.byte_offsets(str(path), [3, 0, 4])
    assert offsets == [len(b"zero\none\r\ntwo\xc2\x85still two\n"), 0, len(b"zero\none\r\ntwo\xc2\x85still two\n\n")]
    scanned = list(tc.iter_lines(str(path), 1, 5))
    sought = list(tc.iter_lines(str(path), 3, 5, byte_start=offsets[0]))
    assert scanned[2:] == sought == [(3, "\n"), (4, "four")]
    assert scanned[1] == (2, "two\x85still two\n")
    with pytest.raises(VlprepError, match="has no line 9"):
        tc.byte_offsets(str(path), [9])


def test_bad_bytes_are_one_error_naming_the_line(vocab_dir, tmp_path):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    with pytest.raises(VlprepError, match=r"bad.txt: line 3 is not UTF-8"):
        tc.tokenize_range(str(corpus), 0, 3, str(tmp_path / "p.npz"), tokenizer=load_tokenizer(str(vocab_dir)))


def test_tokenizer_label_is_the_name_in_file_names(vocab_dir):
    assert tokenizer_label("bert-base-uncased") == "bert-base-uncased"
    assert tokenizer_label("/models/bert-base-uncased/") == "bert-base-uncased"
    assert tokenizer_label("gs://b/tok/bert-base-uncased/vocab.txt") == "bert-base-uncased"
    assert load_tokenizer(str(vocab_dir / "vocab.txt")).cls_token_id == 101


# ---------------------------------------------------------------- keys


@pytest.fixture(scope="module")
def tiny_matcher():
    torch.manual_seed(0)
    return load_matcher("random:5", TINY)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Shape images with odd formats mixed in, plus a truncated JPEG and a text file."""
    root = tmp_path_factory.mktemp("oi") / "images"
    root.mkdir()
    combos = [(c, s) for s in SHAPES for c in COLORS][:14]
    for k, (c, s) in enumerate(combos):
        im = shape_image(c, s, seed=k)
        name = f"{k:04x}beef{k:08x}"
        if k == 3:
            im.convert("CMYK").save(root / f"{name}.jpg", "JPEG")
        elif k == 5:
            im.convert("L").save(root / f"{name}.jpg", "JPEG")
        elif k == 7:
            im.convert("RGBA").save(root / f"{name}.jpg", "PNG")  # PNG bytes named .jpg
        else:
            im.save(root / f"{name}.jpg", quality=90)
    good = (root / f"{0:04x}beef{0:08x}.jpg").read_bytes()
    (root / "ffffbeef00000099.jpg").write_bytes(good[: len(good) // 2])
    (root / "eeeebeef00000098.jpg").write_text("not an image")
    return root


def extract_sharded(model, image_set, out: Path, shards: int, batch: int = 3) -> Path:
    """Shards with bounds at multiples of the batch size (the last takes the rest)."""
    per = -(-len(image_set.ids) // (shards * batch)) * batch
    bounds = [min(i * per, len(image_set.ids)) for i in range(shards)] + [len(image_set.ids)]
    parts, failed = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = str(out / "parts" / f"keys-{shards}-{i}.npz")
        res = mk.extract_keys(model.visn_model, image_set, int(a), int(b), part, transform=eval_transform(TINY),
                              batch_size=batch)
        parts.append(part)
        failed += res["failed"]
    keys_dir = out / f"keys{shards}"
    mk.merge_keys(parts, str(keys_dir), image_set.name)
    return keys_dir, failed


def test_image_set_orders(image_folder, tmp_path):
    folder_set = mk.image_set_from_folder("open_images", str(image_folder))
    assert folder_set.ids == sorted(folder_set.ids) and len(folder_set.ids) == 16
    assert folder_set.uris == [str(image_folder / f"{i}.jpg") for i in folder_set.ids]
    order = list(reversed(folder_set.ids[:5])) + ["00000000deadbeef"]
    (tmp_path / "open_images.ids").write_text("\n".join(order) + "\n")
    listed = mk.image_set_from_ids("open_images", str(tmp_path / "open_images.ids"), "data/open_images/images")
    assert listed.ids == order and listed.uris[0] == f"data/open_images/images/{order[0]}.jpg"
    mk.write_ids(listed, str(tmp_path / "again.ids"))
    assert (tmp_path / "again.ids").read_text() == (tmp_path / "open_images.ids").read_text()


def test_keys_skip_bad_images_and_merge_identically(tiny_matcher, image_folder, tmp_path):
    image_set = mk.image_set_from_folder("open_images", str(image_folder))
    image_set = mk.ImageSet("open_images", image_set.ids + ["00000000deadbeef"],
                            image_set.uris + [str(image_folder / "00000000deadbeef.jpg")])
    one, failed = extract_sharded(tiny_matcher, image_set, tmp_path, 1)
    assert sorted(f["item"] for f in failed) == ["00000000deadbeef", "eeeebeef00000098", "ffffbeef00000099"]
    assert any("cannot" in f["error"] for f in failed)
    keys, paths, ids = fmt.read_keys(str(one), "open_images")
    good = [i for i in image_set.ids if i not in {f["item"] for f in failed}]
    assert ids == good and paths == [str(image_folder / f"{i}.jpg") for i in good]
    assert keys.shape == (14, TINY.dim) and keys.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)
    with h5py.File(one / "open_images.hdf5") as f:
        d = f["keys"]
        assert d.chunks is None and d.compression is None and not dict(d.attrs) and not dict(f.attrs)
    three, failed3 = extract_sharded(tiny_matcher, image_set, tmp_path, 3)
    assert [(f["item"], f["uri"]) for f in failed3] == [(f["item"], f["uri"]) for f in failed]
    for suffix in (".hdf5", ".path", ".ids"):
        assert (one / f"open_images{suffix}").read_bytes() == (three / f"open_images{suffix}").read_bytes()
    unaligned, _ = extract_sharded(tiny_matcher, image_set, tmp_path / "unaligned", 2, batch=4)
    np.testing.assert_allclose(fmt.read_keys(str(unaligned), "open_images")[0], keys, atol=1e-5)
    before = (one / "open_images.hdf5").read_bytes()
    extract_sharded(tiny_matcher, image_set, tmp_path, 1)  # rerun: same files
    assert (one / "open_images.hdf5").read_bytes() == before


def test_keys_file_layout_is_upstreams(shared, tmp_path):
    """Upstream's own keys, written through our writer, give upstream's file byte for byte."""
    up = shared / "fixtures" / "maria" / "keys"
    with h5py.File(up / "open_images.hdf5") as f:
        keys = f["keys"][:]
    paths = (up / "open_images.path").read_text().splitlines()
    ids = (up / "open_images.ids").read_text().splitlines()
    fmt.write_keys(str(tmp_path), "open_images", keys, paths, ids)
    for suffix in (".hdf5", ".path", ".ids"):
        assert (tmp_path / f"open_images{suffix}").read_bytes() == (up / f"open_images{suffix}").read_bytes()
    got_keys, got_paths, got_ids = fmt.read_keys(str(tmp_path), "open_images")
    assert got_ids == ids and got_paths == paths and np.array_equal(got_keys, keys)


# ---------------------------------------------------------------- vokens


def test_first_segment_is_mariass_rule():
    ids = np.arange(1000)
    assert len(vk.first_segment(ids[:128])) == 128
    assert len(vk.first_segment(ids[:129])) == 64  # ceil(129/128) = 2 segments of int(129/2)
    assert len(vk.first_segment(ids[:256])) == 128
    assert len(vk.first_segment(ids[:257])) == 85  # 3 segments of int(257/3)
    assert vk.first_segment(ids[:300]).tolist() == list(range(100))


def test_query_batch_wraps_pads_and_masks_literal_pad():
    ids, mask = vk.query_batch([np.array([5, 0, 6]), np.array([], np.int32)], cls_id=101, sep_id=102, pad_id=0)
    assert ids.tolist() == [[101, 5, 0, 6, 102], [101, 102, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, True, True], [True, True, False, False, False]]


@pytest.fixture(scope="module")
def vokens_inputs(vocab_dir, tmp_path_factory):
    """A tokenized corpus and two key sets of well-separated random unit keys (no near ties to flip)."""
    root = tmp_path_factory.mktemp("vokens")
    tok = load_tokenizer(str(vocab_dir))
    rs = np.random.RandomState(7)
    keys_dir = root / "keys"
    for name, n in (("open_images", 14), ("coco_minival", 4)):
        keys = rs.standard_normal((n, TINY.dim)).astype(np.float32)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        ids = [f"{name[:4]}{k:012x}" for k in range(n)]
        fmt.write_keys(str(keys_dir), name, keys, [f"data/{name}/images/{i}.jpg" for i in ids], ids)
    corpus = root / "train.pkl.txt"
    lines = [f"a {c} {s}\tthe {s} is {c}" for c in COLORS for s in SHAPES][:13] + ["", "red " * 300]
    corpus.write_text("\n".join(lines) + "\n")
    part = str(root / "tokens.npz")
    tc.tokenize_range(str(corpus), 0, len(lines), part, tokenizer=tok)
    prefix = fmt.tokens_prefix(str(root), corpus.name, "tiny-vocab")
    tc.merge_tokens([part], prefix)
    return {"root": root, "tok": tok, "keys_dir": keys_dir, "prefix": prefix, "lines": len(lines), "corpus": corpus}


def vokenize_sharded(inputs, model, bounds, out: Path, key_sets) -> dict:
    parts = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = str(out / "parts" / f"vokens-{i}.npz")
        vk.vokenize_range(inputs["prefix"], a, b, part,
                          vk.Vokenizer(model.lang_model, inputs["tok"], key_sets, page_lines=4))
        parts.append(part)
    return vk.merge_vokens(parts, str(out), inputs["corpus"].name, key_sets)


def test_vokens_match_an_exhaustive_search_and_any_page_aligned_sharding(tiny_matcher, vokens_inputs, tmp_path):
    """Each line through the tower alone, brute-force inner products over all keys: the same top 5."""
    inp = vokens_inputs
    key_sets = vk.load_key_sets(str(inp["keys_dir"]), ["open_images", "coco_minival"])
    assert key_sets.sets == ("coco_minival", "open_images")
    n = inp["lines"]
    one = vokenize_sharded(inp, tiny_matcher, [0, n], tmp_path / "one", key_sets)
    two = vokenize_sharded(inp, tiny_matcher, [0, 8, 12, n], tmp_path / "two", key_sets)
    assert Path(one["vokens"]).name == "train.pkl.txt.coco_minival_open_images.18"
    assert Path(one["vokens"]).read_bytes() == Path(two["vokens"]).read_bytes()
    assert Path(one["vokens"] + ".ids").read_text().splitlines() == key_sets.voken_ids
    assert key_sets.voken_ids[0].startswith("coco_minival/") and key_sets.voken_ids[-1].startswith("open_images/")
    rows = fmt.read_vokens(one["vokens"])
    assert len(rows) == n and all(len(r) == vk.TOPK for r in rows)
    entries = fmt.read_token_lines(inp["prefix"], 0, n)
    names = [Path(p).name for p in key_sets.paths]
    for ids, row in zip(entries, rows, strict=True):
        seq = torch.tensor([[101, *vk.first_segment(ids).tolist(), 102]])
        with torch.no_grad():
            q = tiny_matcher.lang_model(seq, seq != 0).numpy()[0]
        scores = key_sets.keys @ q
        order = np.argsort(-scores, kind="stable")[: vk.TOPK + 1]
        assert np.diff(-scores[order]).min() > 1e-4  # no near tie that float rounding could flip
        assert row == [names[j] for j in order[: vk.TOPK]]
    assert len({tuple(r) for r in rows}) > 3  # different lines retrieve different images


def test_max_images_and_names(vokens_inputs):
    limited = vk.load_key_sets(str(vokens_inputs["keys_dir"]), ["open_images", "coco_minival"], max_images=6)
    assert len(limited.paths) == 6 and limited.keys.shape[0] == 6
    assert limited.voken_ids[4:] == ["open_images/" + i for i in fmt.read_key_names(
        str(vokens_inputs["keys_dir"]), "open_images")[1][:2]]
    assert limited.paths[0] == "data/coco_minival/images/coco000000000000.jpg"
    names_only = vk.load_key_sets(str(vokens_inputs["keys_dir"]), ["open_images"], with_keys=False)
    assert names_only.keys is None and len(names_only.paths) == 14
    assert fmt.vokens_name("valid.pkl.txt", ["open_images"], 494159) == "valid.pkl.txt.open_images.494159"
    assert fmt.vokens_name("wiki.train.raw", ["vg_nococo", "coco_train"], 50000) == "wiki.train.raw.coco_train_vg_nococo"
    with pytest.raises(VlprepError, match="fewer than 5 images"):
        limited_to_three = vk.load_key_sets(str(vokens_inputs["keys_dir"]), ["open_images"], max_images=3)
        limited_to_three.search(np.ones((1, TINY.dim), np.float32))


def test_every_file_round_trips_through_gcs(gcs, vokens_inputs, tiny_matcher, corpus, tmp_path):
    """Parts and outputs on gs:// (the emulator): tokens, keys and vokens read back as written locally."""
    from vlprep import storage

    inp = vokens_inputs
    remote = f"{gcs}/corpus/{corpus.name}"
    storage.upload_file(corpus, remote)
    total = tc.count_lines(remote)
    start = tc.byte_offsets(remote, [5])[0]
    tc.tokenize_range(remote, 0, 5, f"{gcs}/parts/t0.npz", tokenizer=inp["tok"])
    tc.tokenize_range(remote, 5, total, f"{gcs}/parts/t1.npz", tokenizer=inp["tok"], byte_start=start)
    prefix = f"{gcs}/tokens/{corpus.name}.tok"
    tc.merge_tokens([f"{gcs}/parts/t0.npz", f"{gcs}/parts/t1.npz"], prefix, drop_empty=True)
    local = tokenize_sharded(corpus, tmp_path, inp["tok"], 1, drop_empty=True)
    for suffix in ("", ".line", ".hdf5"):
        assert storage.read_bytes(prefix + suffix) == Path(local + suffix).read_bytes()
    keys, paths, ids = fmt.read_keys(str(inp["keys_dir"]), "open_images")
    fmt.write_keys(f"{gcs}/keys", "open_images", keys, paths, ids)
    key_sets = vk.load_key_sets(f"{gcs}/keys", ["open_images"])
    n = len(fmt.read_offsets(prefix)) - 1
    vk.vokenize_range(prefix, 0, n, f"{gcs}/parts/v.npz", vk.Vokenizer(tiny_matcher.lang_model, inp["tok"], key_sets))
    out = vk.merge_vokens([f"{gcs}/parts/v.npz"], f"{gcs}/vokens", corpus.name, key_sets)
    assert out["vokens"] == f"{gcs}/vokens/valid.pkl.txt.open_images.14"
    assert len(fmt.read_vokens(out["vokens"])) == n
    assert storage.read_text(out["vokens"] + ".ids").splitlines() == [f"open_images/{i}" for i in ids]
