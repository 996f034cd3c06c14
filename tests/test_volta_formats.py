"""VOLTA / LXMERT region-feature formats: TSV, LMDB, region H5, hard negatives.

The reference readers and writers in this file are written from the format descriptions (VOLTA
``extract_coco_image.py`` / ``convert_coco_lmdb.py`` / ``_image_features_reader.py``, LXMERT
``load_obj_tsv``), independently of the package code they check.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import lmdb
import numpy as np
import pytest

from vlprep import VlprepError
from vlprep.formats import hard_negatives as hn
from vlprep.formats import region_h5, volta_lmdb, volta_tsv

FIELDS = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
          "num_boxes", "boxes", "features", "cls_prob", "attrs", "classes"]  # fmt: skip
csv.field_size_limit(sys.maxsize)


def make_record(rng, img_id, n=5, d=2048, h=480, w=640):
    x1 = rng.uniform(0, w / 2, n)
    y1 = rng.uniform(0, h / 2, n)
    return {
        "img_id": img_id,
        "img_h": h,
        "img_w": w,
        "obj_ids": rng.integers(0, 1600, n),
        "obj_conf": rng.random(n),
        "attr_ids": rng.integers(0, 400, n),
        "attr_conf": rng.random(n),
        # float64 on purpose: the writer must store float32
        "boxes": np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], axis=1),
        "features": rng.random((n, d), dtype=np.float32),
        "cls_prob": rng.random((n, 1601), dtype=np.float32),
        "attr_prob": rng.random((n, 401), dtype=np.float32),
    }


def b64(array, dtype):
    return base64.b64encode(np.asarray(array).astype(dtype).tobytes()).decode()


def reference_row(r):
    """The dict VOLTA's extract script hands to csv.DictWriter (under Python 3, decoded base64)."""
    return {
        "img_id": r["img_id"], "img_h": r["img_h"], "img_w": r["img_w"],
        "objects_id": b64(r["obj_ids"], "<i8"), "objects_conf": b64(r["obj_conf"], "<f4"),
        "attrs_id": b64(r["attr_ids"], "<i8"), "attrs_conf": b64(r["attr_conf"], "<f4"),
        "num_boxes": len(r["features"]), "boxes": b64(r["boxes"], "<f4"),
        "features": b64(r["features"], "<f4"), "cls_prob": b64(r["cls_prob"], "<f4"),
        "attrs": b64(r["attr_prob"], "<f4"), "classes": b64(r["cls_prob"], "<f4"),
    }  # fmt: skip


def dictwriter_bytes(records, fields=FIELDS):
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, delimiter="\t", fieldnames=fields)
    for r in records:
        row = reference_row(r)
        writer.writerow({f: row[f] for f in fields})
    return buf.getvalue().encode()


def coco_records(rng, numbers, **kw):
    return [make_record(rng, f"COCO_train2014_{i:012d}", **kw) for i in numbers]


# --- TSV ------------------------------------------------------------------------------------------


def test_tsv_bytes_equal_csv_dictwriter(tmp_path):
    rng = np.random.default_rng(0)
    records = coco_records(rng, [9, 25, 30])
    path = tmp_path / "train2014_obj36-36.tsv"
    assert volta_tsv.write_tsv(path, records) == 3
    data = path.read_bytes()
    assert data == dictwriter_bytes(records)
    assert data.count(b"\r\n") == 3 and data.endswith(b"\r\n")  # csv's default line terminator

    buf = io.StringIO(newline="")
    writer = volta_tsv.TsvWriter(buf, volta_tsv.LXMERT_FIELDS)
    for r in records:
        writer.write(r)
    assert buf.getvalue().encode() == dictwriter_bytes(records, FIELDS[:10])


def test_tsv_writer_quotes_like_dictwriter():
    rng = np.random.default_rng(1)
    record = make_record(rng, 'odd\tname "x"', n=2, d=8)
    buf = io.StringIO(newline="")
    volta_tsv.TsvWriter(buf).write(record)
    assert buf.getvalue().encode() == dictwriter_bytes([record])
    assert next(volta_tsv.iter_rows(io.StringIO(buf.getvalue())))["img_id"] == 'odd\tname "x"'


def test_tsv_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    records = coco_records(rng, [1, 2, 3], n=36)
    path = tmp_path / "a.tsv"
    volta_tsv.write_tsv(path, records)
    decoded = list(volta_tsv.read_tsv(path))
    assert [d["img_id"] for d in decoded] == [r["img_id"] for r in records]
    for d, r in zip(decoded, records, strict=True):
        assert (d["img_h"], d["img_w"], d["num_boxes"]) == (480, 640, 36)
        assert d["obj_ids"].dtype == np.int64 and d["attr_ids"].dtype == np.int64
        for key in ("obj_conf", "attr_conf", "boxes", "features", "cls_prob", "attr_prob"):
            assert d[key].dtype == np.float32, key
            np.testing.assert_array_equal(d[key], np.asarray(r[key]).astype(np.float32))
        np.testing.assert_array_equal(d["obj_ids"], r["obj_ids"])
        assert d["boxes"].shape == (36, 4) and d["features"].shape == (36, 2048)
    raw = next(volta_tsv.read_tsv(path, raw=True))
    assert list(raw) == FIELDS and all(isinstance(v, str) for v in raw.values())
    assert raw["classes"] == raw["cls_prob"] and raw["num_boxes"] == "36"
    only = next(volta_tsv.read_tsv(path, keys=["features"]))
    assert "features" in only and "cls_prob" not in only


def test_tsv_rejects_bad_shapes_and_torn_lines(tmp_path):
    rng = np.random.default_rng(3)
    record = make_record(rng, "COCO_train2014_000000000001", n=3, d=8)
    record["boxes"] = record["boxes"][:, :3]
    with pytest.raises(VlprepError, match="boxes"):
        volta_tsv.encode_record(record)
    path = tmp_path / "torn.tsv"
    good = dictwriter_bytes(coco_records(rng, [1, 2], n=3, d=8))
    path.write_bytes(good + b"\r\n" + good.replace(b"\r\n", b"\n"))  # a blank line, Unix line ends
    assert [r["img_id"][-1] for r in volta_tsv.read_tsv(path, raw=True)] == ["1", "2", "1", "2"]
    path.write_bytes(good + good[: len(good) // 4])  # an interrupted append
    with pytest.raises(VlprepError, match="row 3"):
        list(volta_tsv.read_tsv(path, raw=True))


def load_obj_tsv(fname):
    """LXMERT src/utils.py load_obj_tsv, as the format describes it."""
    fieldnames = FIELDS[:10]
    data = []
    with open(fname) as f:
        for item in csv.DictReader(f, fieldnames, delimiter="\t"):
            for key in ["img_h", "img_w", "num_boxes"]:
                item[key] = int(item[key])
            boxes = item["num_boxes"]
            decode_config = [
                ("objects_id", (boxes,), np.int64),
                ("objects_conf", (boxes,), np.float32),
                ("attrs_id", (boxes,), np.int64),
                ("attrs_conf", (boxes,), np.float32),
                ("boxes", (boxes, 4), np.float32),
                ("features", (boxes, -1), np.float32),
            ]
            for key, shape, dtype in decode_config:
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
            data.append(item)
    return data


@pytest.mark.parametrize("fields", [FIELDS[:10], FIELDS])
def test_lxmert_reader_reads_our_tsv(tmp_path, fields):
    rng = np.random.default_rng(4)
    records = coco_records(rng, [5, 6], n=36)
    path = tmp_path / "x.tsv"
    volta_tsv.write_tsv(path, records, fields)
    for item, r in zip(load_obj_tsv(path), records, strict=True):
        assert item["img_id"] == r["img_id"] and item["num_boxes"] == 36
        np.testing.assert_array_equal(item["features"], r["features"])
        np.testing.assert_array_equal(item["boxes"], r["boxes"].astype(np.float32))
        np.testing.assert_array_equal(item["attrs_id"], r["attr_ids"])


def test_merge_keeps_first_row_of_each_id(tmp_path):
    rng = np.random.default_rng(5)
    a, b, c = (coco_records(rng, nums, n=2, d=8) for nums in ([1, 2], [2, 3], [3, 4, 1]))
    parts = []
    for i, recs in enumerate((a, b, c)):
        parts.append(tmp_path / f"train2014_obj36-36.tsv.{i}")
        volta_tsv.write_tsv(parts[-1], recs)
    out = tmp_path / "train2014_obj36-36.tsv"
    out.write_text("stale")
    summary = volta_tsv.merge_tsv(parts, out)
    assert summary["rows"] == 4 and summary["duplicates"] == 3
    assert out.read_bytes() == dictwriter_bytes([a[0], a[1], b[1], c[1]])  # first occurrences, in order
    assert sorted(summary["duplicate_ids"]) == sorted(r["img_id"] for r in (b[0], c[0], c[2]))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    with pytest.raises(VlprepError, match="missing"):
        volta_tsv.merge_tsv([tmp_path / "nope.tsv"], out)
    assert out.read_bytes() == dictwriter_bytes([a[0], a[1], b[1], c[1]])  # untouched by the failure


# --- LMDB -----------------------------------------------------------------------------------------


def volta_lmdb_item(path, image_id):
    """VOLTA's reader up to the decoded arrays: pickle.loads -> str fields -> base64 -> reshape."""
    env = lmdb.open(str(path), max_readers=1, readonly=True, lock=False, readahead=False, meminit=False)
    with env.begin(write=False) as txn:
        keys = pickle.loads(txn.get(b"keys"))
        item = pickle.loads(txn.get(str(image_id).encode()))
    env.close()
    return keys, item


def test_lmdb_from_tsv_readable_by_volta_logic(tmp_path):
    rng = np.random.default_rng(6)
    records = coco_records(rng, [9, 42, 1000], n=36)
    tsv = tmp_path / "train2014_obj36-36.tsv"
    volta_tsv.write_tsv(tsv, records)
    out = tmp_path / "trainval_feat.lmdb"
    summary = volta_lmdb.build_lmdb_from_tsv([tsv], out, "coco", commit_every=2)
    assert summary["records"] == 3 and os.path.isdir(out)

    keys, item = volta_lmdb_item(out, 42)
    assert keys == [b"9", b"42", b"1000"]
    assert list(item) == FIELDS and all(isinstance(v, str) for v in item.values())
    assert (item["img_id"], item["img_h"], item["img_w"], item["num_boxes"]) == (
        "COCO_train2014_000000000042",
        "480",
        "640",
        "36",
    )
    features = np.frombuffer(base64.b64decode(item["features"]), dtype=np.float32).reshape(-1, 2048)
    boxes = np.frombuffer(base64.b64decode(item["boxes"]), dtype=np.float32).reshape(-1, 4)
    np.testing.assert_array_equal(features, records[1]["features"])
    np.testing.assert_array_equal(boxes, records[1]["boxes"].astype(np.float32))
    assert item == next(r for r in volta_tsv.read_tsv(tsv, raw=True) if r["img_id"].endswith("42"))

    env = lmdb.open(str(out), readonly=True, lock=False)
    with env.begin() as txn:
        raw_value = txn.get(b"9")
        assert env.stat()["entries"] == 4  # 3 images + keys
    env.close()
    assert raw_value[:2] == b"\x80\x04"  # pickle protocol 4: readable by VOLTA's Python 3.6
    assert os.path.getsize(out / "data.mdb") < 10 * len(tsv.read_bytes())  # not a 1 TiB sparse file


def test_lmdb_key_rules(tmp_path):
    assert volta_lmdb.lmdb_key("COCO_val2014_000000000009", "coco") == b"9"
    assert volta_lmdb.lmdb_key("COCO_test2015_000000123456", "coco") == b"123456"
    assert volta_lmdb.lmdb_key("1000092795", "flickr30k") == b"1000092795"
    assert volta_lmdb.lmdb_key(1000092795, "flickr30k") == b"1000092795"
    with pytest.raises(VlprepError):
        volta_lmdb.lmdb_key("x", "vqa")
    rng = np.random.default_rng(7)
    rows = [volta_tsv.encode_record(make_record(rng, i, n=2, d=8)) for i in ("1000092795", "36979")]
    volta_lmdb.build_lmdb(rows, tmp_path / "flickr30k_feat.lmdb", "flickr30k")
    keys, item = volta_lmdb_item(tmp_path / "flickr30k_feat.lmdb", 36979)
    assert keys == [b"1000092795", b"36979"] and item["img_id"] == "36979"


def test_lmdb_duplicate_key_is_an_error(tmp_path):
    rng = np.random.default_rng(8)
    rows = [
        volta_tsv.encode_record(make_record(rng, f"COCO_{s}_000000000009", n=2, d=8))
        for s in ("train2014", "val2014")
    ]
    with pytest.raises(VlprepError, match=r"duplicate image key b'9'.*COCO_val2014_000000000009"):
        volta_lmdb.build_lmdb(rows, tmp_path / "x.lmdb", "coco", commit_every=1)
    assert os.listdir(tmp_path) == []  # no final directory, no temp directory


def test_lmdb_build_commits_as_it_goes_and_failure_leaves_nothing(tmp_path):
    rng = np.random.default_rng(9)
    committed = []

    def rows():
        for i in range(1, 8):
            if i == 6:
                (building,) = [p for p in os.listdir(tmp_path) if p.startswith(".tmp-trainval_feat.lmdb.")]
                # another process, as py-lmdb opens an environment once per process
                count = "import lmdb, sys; print(lmdb.open(sys.argv[1], readonly=True, lock=False).stat()['entries'])"
                res = subprocess.run(
                    [sys.executable, "-c", count, str(tmp_path / building)], capture_output=True, text=True
                )
                committed.append(int(res.stdout))
                raise RuntimeError("extraction died")
            yield volta_tsv.encode_record(make_record(rng, f"COCO_train2014_{i:012d}", n=2, d=8))

    with pytest.raises(RuntimeError, match="extraction died"):
        volta_lmdb.build_lmdb(rows(), tmp_path / "trainval_feat.lmdb", "coco", commit_every=2)
    assert committed == [4]  # 5 rows put, 2 transactions of 2 committed: memory stays bounded
    assert os.listdir(tmp_path) == []


def test_lmdb_killed_build_leaves_no_final_directory(tmp_path):
    script = textwrap.dedent(
        """
        import sys, time, numpy as np
        from pathlib import Path
        from vlprep.formats import volta_lmdb, volta_tsv
        out = Path(sys.argv[1])
        def rows():
            rng = np.random.default_rng(0)
            for i in range(1, 1000):
                if i == 10:
                    (out.parent / "halfway").write_text("x")
                    time.sleep(60)
                r = dict(img_id=f"COCO_train2014_{i:012d}", img_h=10, img_w=10, obj_ids=[1], obj_conf=[1.0],
                         attr_ids=[1], attr_conf=[1.0], boxes=[[0, 0, 5, 5]], features=rng.random((1, 2048)),
                         cls_prob=np.zeros((1, 1601)), attr_prob=np.zeros((1, 401)))
                yield volta_tsv.encode_record(r)
        volta_lmdb.build_lmdb(rows(), out, "coco", commit_every=3)
        """
    )
    out = tmp_path / "trainval_feat.lmdb"
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)])
    try:
        deadline = time.time() + 60
        while not (tmp_path / "halfway").exists():
            assert proc.poll() is None and time.time() < deadline, "builder did not reach the halfway point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists()
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".tmp-trainval_feat.lmdb.")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".")  # hidden, never the final name


# --- reader semantics -----------------------------------------------------------------------------


def volta_reader(item, num_locs, add_global, norm, feature_size=2048):
    """VOLTA _image_features_reader.__getitem__ (not in memory), written from the spec."""
    image_h, image_w = int(item["img_h"]), int(item["img_w"])
    try:
        features = np.frombuffer(base64.b64decode(item["features"]), dtype=np.float32).reshape(
            -1, feature_size
        )
        boxes = np.frombuffer(base64.b64decode(item["boxes"]), dtype=np.float32).reshape(-1, 4)
    except Exception:  # upstream: a bare except, for the numpy values of an H5-derived LMDB
        features = item["features"].reshape(-1, feature_size)
        boxes = item["boxes"].reshape(-1, 4)
    loc = np.zeros((boxes.shape[0], num_locs), dtype=np.float32)
    loc[:, :4] = boxes
    if num_locs >= 5:
        loc[:, -1] = (loc[:, 3] - loc[:, 1]) * (loc[:, 2] - loc[:, 0]) / (float(image_w) * float(image_h))
    ori = loc.copy()
    loc[:, 0] = loc[:, 0] / float(image_w)
    loc[:, 1] = loc[:, 1] / float(image_h)
    loc[:, 2] = loc[:, 2] / float(image_w)
    loc[:, 3] = loc[:, 3] / float(image_h)
    if num_locs > 5:
        loc[:, 4] = loc[:, 2] - loc[:, 0]
        loc[:, 5] = loc[:, 3] - loc[:, 1]
    if norm:
        features = features / np.linalg.norm(features, axis=-1, keepdims=True)
        loc = loc / np.linalg.norm(loc, 2, 1, keepdims=True)
    num_boxes = features.shape[0]
    if add_global:
        g_feat = np.sum(features, axis=0) / num_boxes
        num_boxes += 1
        g_loc = np.array([[0, 0, 1, 1] + [1] * (num_locs - 4)])
        g_ori = np.array([[0, 0, image_w, image_h] + [image_w * image_h] * (num_locs - 4)])
        if add_global == "first":
            features, loc, ori = (
                np.concatenate([g_feat[None], features]),
                np.concatenate([g_loc, loc]),
                np.concatenate([g_ori, ori]),
            )
        else:
            features, loc, ori = (
                np.concatenate([features, g_feat[None]]),
                np.concatenate([loc, g_loc]),
                np.concatenate([ori, g_ori]),
            )
    return features, num_boxes, loc, ori


def hand_record():
    features = np.zeros((2, 2048), dtype=np.float32)
    features[0, :2] = [3.0, 4.0]  # norm 5
    features[1, 0] = 2.0
    return {
        "img_id": "COCO_val2014_000000000077", "img_h": 100, "img_w": 200,
        "obj_ids": [1, 2], "obj_conf": [0.5, 0.5], "attr_ids": [3, 4], "attr_conf": [0.1, 0.2],
        "boxes": [[20, 10, 120, 60], [0, 0, 200, 100]], "features": features,
        "cls_prob": np.zeros((2, 1601)), "attr_prob": np.zeros((2, 401)),
    }  # fmt: skip


def test_spatial_encodings_hand_computed():
    row = volta_tsv.encode_record(hand_record())
    f = volta_lmdb.region_features
    _, n, loc, ori = f(row, num_locs=4)
    assert n == 2
    np.testing.assert_allclose(loc, [[0.1, 0.1, 0.6, 0.6], [0, 0, 1, 1]], rtol=1e-6)
    np.testing.assert_array_equal(ori, [[20, 10, 120, 60], [0, 0, 200, 100]])
    _, _, loc, ori = f(row, num_locs=5)
    np.testing.assert_allclose(loc, [[0.1, 0.1, 0.6, 0.6, 0.25], [0, 0, 1, 1, 1]], rtol=1e-6)
    np.testing.assert_allclose(ori, [[20, 10, 120, 60, 0.25], [0, 0, 200, 100, 1]], rtol=1e-6)
    _, _, loc, ori = f(row, num_locs=7)
    np.testing.assert_allclose(loc, [[0.1, 0.1, 0.6, 0.6, 0.5, 0.5, 0.25], [0, 0, 1, 1, 1, 1, 1]], rtol=1e-6)
    np.testing.assert_allclose(ori, [[20, 10, 120, 60, 0, 0, 0.25], [0, 0, 200, 100, 0, 0, 1]], rtol=1e-6)
    with pytest.raises(VlprepError):
        f(row, num_locs=6)


@pytest.mark.parametrize("where", ["first", "last"])
def test_global_feature_first_last(where):
    row = volta_tsv.encode_record(hand_record())
    feats, n, loc, ori = volta_lmdb.region_features(row, num_locs=5, add_global_imgfeat=where)
    g = 0 if where == "first" else -1
    regions = slice(1, None) if where == "first" else slice(0, -1)
    assert n == 3 and feats.shape == (3, 2048) and loc.shape == (3, 5) and ori.shape == (3, 5)
    np.testing.assert_allclose(feats[g, :2], [2.5, 2.0])  # mean of (3, 4) and (2, 0)
    np.testing.assert_array_equal(loc[g], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ori[g], [0, 0, 200, 100, 20000])
    np.testing.assert_allclose(loc[regions][0], [0.1, 0.1, 0.6, 0.6, 0.25], rtol=1e-6)
    np.testing.assert_array_equal(feats[regions], hand_record()["features"])

    feats, n, loc, _ = volta_lmdb.region_features(
        row, num_locs=5, add_global_imgfeat=where, norm_embeddings=True
    )
    np.testing.assert_allclose(np.linalg.norm(feats[regions], axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(feats[g, :2], [(0.6 + 1) / 2, 0.8 / 2], rtol=1e-6)  # mean of normalised rows
    np.testing.assert_allclose(np.linalg.norm(loc[regions], axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(loc[g], [0, 0, 1, 1, 1])


def test_readers_match_volta_logic_on_tsv_and_h5_lmdbs(tmp_path):
    rng = np.random.default_rng(10)
    records = coco_records(rng, [3, 14], n=36)
    tsv = tmp_path / "x.tsv"
    volta_tsv.write_tsv(tsv, records)
    volta_lmdb.build_lmdb_from_tsv([tsv], tmp_path / "tsv.lmdb", "coco")
    h5 = tmp_path / "x.h5"
    region_h5.write_region_h5(h5, records)
    region_h5.h5_to_lmdb(h5, tmp_path / "h5.lmdb", dataset="coco")
    readers = {
        "tsv-lmdb": lambda **o: volta_lmdb.LmdbFeatureReader(tmp_path / "tsv.lmdb", **o),
        "h5-lmdb": lambda **o: volta_lmdb.LmdbFeatureReader(tmp_path / "h5.lmdb", **o),
        "tsv": lambda **o: volta_lmdb.TsvFeatureReader(tsv, "coco", **o),
    }
    for num_locs in (4, 5, 7):
        for where in (None, "first", "last"):
            for norm in (False, True):
                options = {"num_locs": num_locs, "add_global_imgfeat": where, "norm_embeddings": norm}
                for name, open_reader in readers.items():
                    with open_reader(**options) as reader:
                        assert reader.keys() == [b"3", b"14"] and len(reader) == 2 and 14 in reader
                        got = reader[14]
                        want = volta_reader(reader.item(14), num_locs, where, norm)
                    assert got[1] == want[1], (name, options)
                    for g, w in zip(got[::2] + got[3:], want[::2] + want[3:], strict=True):
                        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7, err_msg=f"{name} {options}")
    with volta_lmdb.LmdbFeatureReader(tmp_path / "tsv.lmdb") as reader, pytest.raises(KeyError):
        reader[15]


def test_restricted_unpickler_refuses_code():
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with pytest.raises(VlprepError, match="refusing to unpickle global posix.system"):
        volta_lmdb.loads(pickle.dumps({"features": Evil()}))
    value = {"a": np.arange(3), "b": np.float32(2), "c": "x", "d": np.float64(0.5)}
    data = volta_lmdb.dumps(value)
    assert b"numpy._core" not in data and data[:2] == b"\x80\x04"
    assert volta_lmdb.loads(data)["d"] == 0.5 and volta_lmdb.loads(data)["b"].dtype == np.float32
    out = volta_lmdb.loads(pickle.dumps(value))  # numpy-2 pickles load too
    np.testing.assert_array_equal(out["a"], value["a"])


# --- region H5 ------------------------------------------------------------------------------------


def test_region_h5_round_trip_and_layout(tmp_path):
    rng = np.random.default_rng(11)
    records = [
        make_record(rng, stem, n=36) for stem in ("COCO_val2014_000000000042", "COCO_val2014_000000000007")
    ]
    path = tmp_path / "valid_boxes36.h5"
    assert region_h5.write_region_h5(path, records) == 2
    with h5py.File(path, "r") as f:
        g = f["COCO_val2014_000000000042"]
        assert sorted(g) == sorted(
            ["features", "obj_id", "obj_conf", "attr_id", "attr_conf", "boxes", "img_w", "img_h"]
        )
        assert g["features"].dtype == np.float32 and g["features"].shape == (36, 2048)
        assert g["obj_id"].dtype == np.int64 and g["attr_id"].dtype == np.int64
        assert g["boxes"].dtype == np.float32 and g["boxes"].shape == (36, 4)
        assert g["img_w"].shape == () and g["img_w"][()] == 640 and g["img_h"][()] == 480
    back = {r["img_id"]: r for r in region_h5.read_region_h5(path)}
    for r in records:
        b = back[r["img_id"]]
        for key in ("features", "obj_ids", "attr_ids", "obj_conf", "attr_conf", "boxes"):
            np.testing.assert_array_equal(b[key], np.asarray(r[key]).astype(b[key].dtype))
    with pytest.raises(VlprepError, match="exists"):
        region_h5.write_region_h5(path, records)


def test_h5_to_lmdb_values(tmp_path):
    rng = np.random.default_rng(12)
    records = [make_record(rng, stem, n=4, d=16) for stem in ("36979", "1000092795")]
    h5 = tmp_path / "flickr30k_boxes36.h5"
    region_h5.write_region_h5(h5, records)
    out = tmp_path / "flickr30k_feat.lmdb"
    assert region_h5.h5_to_lmdb(h5, out)["records"] == 2
    env = lmdb.open(str(out), readonly=True, lock=False)
    with env.begin() as txn:
        keys = pickle.loads(txn.get(b"keys"))
        raw = txn.get(b"36979")
    env.close()
    assert keys == [b"1000092795", b"36979"]  # h5py group order (sorted), key = group name
    assert b"numpy._core" not in raw and b"numpy.core.multiarray" in raw  # loadable by numpy 1.x
    item = pickle.loads(raw)
    assert list(item) == [
        "attr_conf",
        "attr_id",
        "boxes",
        "features",
        "img_h",
        "img_w",
        "obj_conf",
        "obj_id",
        "img_id",
    ]
    assert item["img_id"] == "36979" and int(item["img_w"]) == 640
    np.testing.assert_array_equal(item["features"], records[0]["features"])
    region_h5.h5_to_lmdb(h5, tmp_path / "coco.lmdb", dataset="coco")  # key rule applied on request
    with volta_lmdb.LmdbFeatureReader(tmp_path / "coco.lmdb", feature_size=16) as reader:
        assert reader.keys() == [b"1000092795", b"36979"]


# --- hard negatives -------------------------------------------------------------------------------


def brute_force_pool(x, k):
    x = x.astype(np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, -1)
    return np.argsort(d, axis=1, kind="stable")[:, :k], d


def test_hard_negatives_match_brute_force():
    rng = np.random.default_rng(13)
    n, d = 160, 24
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[7] = x[3]  # exact duplicates of image 3
    x[50] = x[3]
    ids = [int(i) for i in rng.choice(10**6, n, replace=False)]
    order = rng.permutation(n)  # features arrive in another order than the train list, plus extras
    stream = [(ids[i], x[i]) for i in order] + [(-5, np.zeros(d))]
    pool = hn.build_hard_negatives(ids, stream, batch=37)
    assert pool["train_image_list"] == ids
    hard = pool["train_hard_pool"]
    assert hard.dtype == np.int64 and hard.shape == (n, 100)
    np.testing.assert_array_equal(hard[:, 0], np.arange(n))  # itself first, duplicates included
    assert (
        list(hard[3, :3]) == [3, 7, 50]
        and list(hard[7, :3]) == [7, 3, 50]
        and list(hard[50, :3]) == [50, 3, 7]
    )
    want, dist = brute_force_pool(x, 100)
    np.testing.assert_array_equal(hard, want)
    assert np.all(np.diff(np.take_along_axis(dist, hard, axis=1)[:, 1:], axis=1) >= 0)  # sorted by distance


def test_hard_negatives_small_and_missing():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    pool = hn.build_hard_negatives([10, 11, 12, 13, 14], zip([10, 11, 12, 13, 14], x, strict=True))
    assert pool["train_hard_pool"].shape == (5, 5)  # fewer than 100 images: every other image
    np.testing.assert_array_equal(pool["train_hard_pool"], brute_force_pool(x, 5)[0])
    with pytest.raises(VlprepError, match="no features"):
        hn.build_hard_negatives([10, 11, 99], zip([10, 11], x, strict=False))
    with pytest.raises(VlprepError, match="at least 2"):
        hn.build_hard_negatives([10], zip([10], x, strict=False))
    with pytest.raises(VlprepError, match="two feature rows"):
        hn.build_hard_negatives([10, 11], [(10, x[0]), (11, x[1]), (10, x[2])])


def test_hard_negative_pickle_and_mean_features(tmp_path):
    rng = np.random.default_rng(15)
    records = coco_records(rng, [9, 25, 30, 31], n=3, d=2048)
    tsv = tmp_path / "train2014_obj36-36.tsv"
    volta_tsv.write_tsv(tsv, records)
    means = list(hn.mean_features_tsv(tsv, "coco"))
    assert [i for i, _ in means] == [9, 25, 30, 31]
    np.testing.assert_allclose(means[1][1], records[1]["features"].mean(0), rtol=1e-6)
    volta_lmdb.build_lmdb_from_tsv([tsv], tmp_path / "f.lmdb", "coco")
    from_lmdb = list(hn.mean_features_lmdb(tmp_path / "f.lmdb"))
    assert [i for i, _ in from_lmdb] == [9, 25, 30, 31]
    np.testing.assert_array_equal(from_lmdb[2][1], means[2][1])

    pool = hn.build_hard_negatives([31, 9, 25, 30], means)
    path = tmp_path / "hard_negative.pkl"
    hn.write_hard_negatives(path, pool)
    data = path.read_bytes()
    assert data[:2] == b"\x80\x04" and b"numpy._core" not in data
    loaded = pickle.loads(data)  # what VOLTA's loader does
    assert loaded["train_image_list"] == [31, 9, 25, 30]
    np.testing.assert_array_equal(loaded["train_hard_pool"], pool["train_hard_pool"])
    assert hn.read_hard_negatives(path)["train_hard_pool"].dtype == np.int64


# --- optional: the real VOLTA environment ---------------------------------------------------------

VOLTA_PYTHON = os.environ.get("VLPREP_VOLTA_PYTHON")  # a Python 3.6 with numpy 1.x and lmdb 0.94


@pytest.mark.skipif(
    not VOLTA_PYTHON, reason="set VLPREP_VOLTA_PYTHON to a Python 3.6 + numpy 1.x + lmdb interpreter"
)
def test_volta_environment_reads_our_outputs(tmp_path):
    rng = np.random.default_rng(16)
    records = coco_records(rng, [9, 25], n=36)
    tsv = tmp_path / "t.tsv"
    volta_tsv.write_tsv(tsv, records)
    volta_lmdb.build_lmdb_from_tsv([tsv], tmp_path / "tsv.lmdb", "coco")
    region_h5.write_region_h5(tmp_path / "r.h5", records)
    region_h5.h5_to_lmdb(tmp_path / "r.h5", tmp_path / "h5.lmdb", dataset="coco")
    pool = hn.build_hard_negatives([9, 25], hn.mean_features_tsv(tsv, "coco"))
    hn.write_hard_negatives(tmp_path / "hard_negative.pkl", pool)
    script = textwrap.dedent(
        """
        import base64, pickle, sys, lmdb, numpy as np
        out = []
        for name in ("tsv.lmdb", "h5.lmdb"):
            env = lmdb.open(sys.argv[1] + "/" + name, max_readers=1, readonly=True, lock=False, readahead=False, meminit=False)
            with env.begin(write=False) as txn:
                keys = pickle.loads(txn.get("keys".encode()))
                item = pickle.loads(txn.get(keys[1]))
            try:
                f = np.frombuffer(base64.b64decode(item["features"]), dtype=np.float32).reshape(-1, 2048)
            except Exception:
                f = item["features"].reshape(-1, 2048)
            out.append("%s %d %.6f" % (keys[1].decode(), f.shape[0], float(f.sum())))
        pool = pickle.load(open(sys.argv[1] + "/hard_negative.pkl", "rb"))
        out.append("%s %s" % (pool["train_image_list"], pool["train_hard_pool"].tolist()))
        print("|".join(out))
        """
    )
    res = subprocess.run(
        [VOLTA_PYTHON, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True
    )
    total = float(records[1]["features"].sum(dtype=np.float32))
    tsv_line, h5_line, pool_line = res.stdout.strip().split("|")
    assert tsv_line.split()[:2] == ["25", "36"] and h5_line.split()[:2] == ["25", "36"]
    assert abs(float(tsv_line.split()[2]) - total) < 1e-2 * abs(total)
    assert pool_line == "[9, 25] [[0, 1], [1, 0]]"


def _small_lmdb(tmp_path, n=40):
    rng = np.random.default_rng(3)
    rows = [volta_tsv.encode_record(make_record(rng, f"COCO_train2014_{i:012d}", n=10)) for i in range(1, n + 1)]
    return volta_lmdb.build_lmdb(rows, tmp_path / "feat.lmdb", "coco")["path"]


def test_lmdb_reader_refuses_a_truncated_file_with_one_clear_error(tmp_path):
    path = _small_lmdb(tmp_path)
    with volta_lmdb.LmdbFeatureReader(path) as reader:
        assert reader[1][1] == 10  # whole: reads
    data = os.path.join(path, "data.mdb")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 3)
    # in a child process: before the check, this was a SIGBUS that killed the interpreter
    code = ("import sys; from vlprep.formats import volta_lmdb\n"
            "try:\n    r = volta_lmdb.LmdbFeatureReader(sys.argv[1]); [r[k] for k in range(1, 41)]\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    res = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("VlprepError") and "data.mdb: truncated" in res.stdout


def test_lmdb_reader_on_garbage_and_bit_flips(tmp_path):
    path = _small_lmdb(tmp_path)
    data = os.path.join(path, "data.mdb")
    raw = bytearray(open(data, "rb").read())
    (tmp_path / "garbage.lmdb").mkdir()
    (tmp_path / "garbage.lmdb" / "data.mdb").write_bytes(os.urandom(len(raw)))
    with pytest.raises(VlprepError, match="not an LMDB data file"):
        volta_lmdb.LmdbFeatureReader(tmp_path / "garbage.lmdb")
    # flip bytes inside the stored values (base64 text): a clear error per image, never binascii.Error
    start = raw.find(b"features") + 40
    raw[start:start + 64] = b"\xff" * 64
    open(data, "wb").write(bytes(raw))
    errors = []
    with volta_lmdb.LmdbFeatureReader(path) as reader:
        for k in range(1, 41):
            try:
                reader[k]
            except VlprepError as e:
                errors.append(str(e))
    assert errors and all("feat.lmdb" in e for e in errors)


def test_tsv_reader_on_garbage_gives_one_clear_error(tmp_path):
    bad = tmp_path / "garbage.tsv"
    bad.write_bytes(b"\xff\xfe\x00garbage\tx\n" + os.urandom(2000).replace(b"\n", b""))
    with pytest.raises(VlprepError, match="garbage.tsv: the line at byte 0 has no readable image id"):
        volta_lmdb.TsvFeatureReader(bad, "coco")
    rng = np.random.default_rng(4)
    good = tmp_path / "flipped.tsv"
    row = volta_tsv.encode_record(make_record(rng, "COCO_val2014_000000000042", n=3, d=8))
    line = "\t".join(row[f] for f in volta_tsv.VOLTA_FIELDS)
    good.write_bytes(line.replace(row["features"][:40], "!!!!" + row["features"][4:40]).encode() + b"\n")
    with volta_lmdb.TsvFeatureReader(good, "coco", feature_size=8) as reader:
        with pytest.raises(VlprepError, match="flipped.tsv: the value of image 42 is corrupt"):
            reader[42]
