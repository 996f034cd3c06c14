"""X-LXMERT feature HDF5s: names, shard parts, merge, reader, and X-LXMERT's own reads on our files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from vlprep import VlprepError, storage
from vlprep.formats import xlxmert_h5 as xh

DIM = 24  # small feature size: the layout is the same at 2048


def grid_records(n, seed=0, dim=DIM):
    rng = np.random.default_rng(seed)
    return {f"COCO_train2014_{i:012d}": {"features": rng.standard_normal((8, 8, dim), dtype=np.float32)} for i in range(n)}


def boxes_records(n, seed=0, dim=DIM):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        w, h = int(rng.integers(100, 900)), int(rng.integers(100, 900))
        x1, y1 = rng.uniform(0, w - 2, 36), rng.uniform(0, h - 2, 36)
        boxes = np.stack([x1, y1, rng.uniform(x1 + 1, w + 3), rng.uniform(y1 + 1, h + 3)], 1)  # some past the edge
        out[f"{i:07d}"] = {
            "features": rng.random((36, dim), dtype=np.float32),
            "obj_id": rng.integers(0, 1600, 36),
            "boxes": boxes.astype(np.float32),
            "img_w": w,
            "img_h": h,
        }
    return out


def write_parts(root, records, layout, shards):
    """Shard parts as a stage writes them: contiguous ranges of the sorted stems."""
    stems = sorted(records)
    bounds = np.linspace(0, len(stems), shards + 1).astype(int)
    prefixes = []
    for s in range(shards):
        prefix = storage.join(root, f"shard-{s:05d}", layout.kind)
        with xh.PartWriter(prefix, layout.fields) as part:
            for stem in stems[bounds[s] : bounds[s + 1]]:
                part.add(stem, records[stem], image=f"train2014/{stem}.jpg")
        assert part.names == [*(f"{f}.npy" for f in layout.fields), "images.jsonl"]
        prefixes.append(prefix)
    return prefixes


def test_feature_file_names():
    assert xh.feature_file("coco", "train2014") == "COCO/features/maskrcnn_train_grid8.h5"
    assert xh.feature_file("coco", "val2014") == "COCO/features/maskrcnn_valid_grid8.h5"
    assert xh.feature_file("coco", "test2015", kind="boxes36") == "COCO/features/maskrcnn_test_boxes36.h5"
    assert xh.feature_file("coco", "valid") == "COCO/features/maskrcnn_valid_grid8.h5"
    assert xh.feature_file("vg") == "VG/features/maskrcnn_grid8.h5"
    assert xh.feature_file("vg", kind="boxes36") == "VG/features/maskrcnn_boxes36.h5"
    assert xh.feature_file("gqa", imsize=256) == "GQA/features/maskrcnn_grid8_imsize256.h5"
    assert xh.feature_file("nlvr2", "dev") == "nlvr2/features/maskrcnn_valid_v4_grid8.h5"
    assert xh.feature_file("nlvr2", "test1", imsize=128) == "nlvr2/features/maskrcnn_test_v4_grid8_imsize128.h5"
    for bad in (
        lambda: xh.feature_file("vg", "train"),
        lambda: xh.feature_file("coco", "train2017"),
        lambda: xh.feature_file("coco", None),
        lambda: xh.feature_file("flickr", "train"),
        lambda: xh.feature_file("coco", "train2014", kind="boxes36", imsize=224),
        lambda: xh.feature_file("coco", "train2014", kind="grid"),
    ):
        with pytest.raises(VlprepError):
            bad()


def test_grid_boxes_order():
    boxes = xh.grid_boxes(8)
    assert boxes.shape == (64, 4) and boxes.dtype == np.float32
    assert boxes[0].tolist() == [0, 0, 0.125, 0.125]
    assert boxes[1].tolist() == [0.125, 0, 0.25, 0.125]  # index i*8+j: j (x) moves first
    assert boxes[8].tolist() == [0, 0.125, 0.125, 0.25]


@pytest.mark.parametrize("kind, make", [("grid8", grid_records), ("boxes36", boxes_records)])
def test_merge_is_the_same_for_any_shard_count(tmp_path, kind, make):
    layout = xh.Layout(kind, DIM)
    records = make(23)
    outputs = []
    for shards in (1, 4):
        prefixes = write_parts(str(tmp_path / f"work{shards}"), records, layout, shards)
        out = str(tmp_path / f"out{shards}" / xh.feature_file("coco", "train2014", kind=kind))
        assert xh.merge_parts(prefixes, out, layout) == {"path": out, "images": 23}
        outputs.append(out)
    assert open(outputs[0], "rb").read() == open(outputs[1], "rb").read()
    with xh.XlxmertH5Reader(outputs[1]) as reader:
        assert reader.layout == layout
        assert reader.keys() == sorted(records)
        for stem, record in records.items():
            got = reader[stem]
            for name, value in record.items():
                np.testing.assert_array_equal(got[name], value)


def test_part_files_are_plain_npy_and_jsonl(tmp_path):
    layout = xh.Layout("boxes36", DIM)
    records = boxes_records(5)
    [prefix] = write_parts(str(tmp_path), records, layout, 1)
    stems = sorted(records)
    lines = [json.loads(line) for line in open(f"{prefix}/images.jsonl", encoding="utf-8")]
    assert lines == [{"stem": s, "image": f"train2014/{s}.jpg"} for s in stems]
    obj_id = np.load(f"{prefix}/obj_id.npy")
    assert obj_id.dtype == np.int64 and obj_id.shape == (5, 36)
    np.testing.assert_array_equal(obj_id, [records[s]["obj_id"] for s in stems])
    np.testing.assert_array_equal(np.load(f"{prefix}/img_w.npy"), [records[s]["img_w"] for s in stems])
    assert xh.part_count(prefix, layout.fields) == 5


def test_empty_part_merges(tmp_path):
    layout = xh.Layout("grid8", DIM)
    with xh.PartWriter(str(tmp_path / "empty"), layout.fields):
        pass
    full = write_parts(str(tmp_path / "full"), grid_records(3), layout, 1)
    out = str(tmp_path / "out.h5")
    assert xh.merge_parts([str(tmp_path / "empty"), *full], out, layout)["images"] == 3


def test_duplicate_stem_names_both_images(tmp_path):
    layout = xh.Layout("grid8", DIM)
    records = grid_records(2)
    stem = sorted(records)[0]
    with xh.PartWriter(str(tmp_path / "a"), layout.fields) as part:
        part.add(stem, records[stem], image="images/val2014/x.jpg")
    with xh.PartWriter(str(tmp_path / "b"), layout.fields) as part:
        part.add(stem, records[stem], image="images/val2014/sub/x.png")
    out = tmp_path / "out.h5"
    with pytest.raises(VlprepError) as err:
        xh.merge_parts([str(tmp_path / "a"), str(tmp_path / "b")], str(out), layout)
    assert "images/val2014/x.jpg" in str(err.value) and "images/val2014/sub/x.png" in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))  # nothing half-written


def test_bad_records_are_rejected(tmp_path):
    layout = xh.Layout("boxes36", DIM)
    good = boxes_records(1)["0000000"]
    with xh.PartWriter(str(tmp_path / "p"), layout.fields) as part:
        with pytest.raises(VlprepError, match="features"):
            part.add("a", {**good, "features": good["features"][:35]})
        with pytest.raises(VlprepError, match="obj_id"):
            part.add("a", {**good, "obj_id": good["obj_id"].astype(np.float32)})
        with pytest.raises(VlprepError, match="NaN"):
            part.add("a", {**good, "boxes": np.full((36, 4), np.nan, np.float32)})
        with pytest.raises(VlprepError, match="img_h"):
            part.add("a", {k: v for k, v in good.items() if k != "img_h"})
        with pytest.raises(VlprepError, match="stem"):
            part.add("a/b", good)
    with pytest.raises(VlprepError, match="kind"):
        xh.Layout("grids8")


def test_truncated_part_is_refused(tmp_path):
    layout = xh.Layout("grid8", DIM)
    [prefix] = write_parts(str(tmp_path), grid_records(3), layout, 1)
    lines = open(f"{prefix}/images.jsonl", encoding="utf-8").readlines()
    open(f"{prefix}/images.jsonl", "w", encoding="utf-8").writelines(lines[:2])
    with pytest.raises(VlprepError, match="row count"):
        xh.merge_parts([prefix], str(tmp_path / "out.h5"), layout)


def test_parts_and_merge_on_gcs(gcs, tmp_path):
    layout = xh.Layout("grid8", DIM)
    records = grid_records(7)
    prefixes = write_parts(gcs, records, layout, 3)
    out = storage.join(gcs, xh.feature_file("coco", "train2014"))
    assert xh.merge_parts(prefixes, out, layout)["images"] == 7
    with storage.local_copy(out) as local, xh.XlxmertH5Reader(local) as reader:
        assert reader.keys() == sorted(records)
        np.testing.assert_array_equal(reader[sorted(records)[4]]["features"], records[sorted(records)[4]]["features"])


def test_streaming_writer_publishes_only_on_success(tmp_path):
    layout = xh.Layout("grid8", DIM)
    records = grid_records(2)
    out = tmp_path / "w.h5"
    with pytest.raises(VlprepError):
        with xh.open_h5_writer(str(out), layout) as writer:
            for stem, record in records.items():
                writer.add(stem, record)
            writer.add(stem, record)  # the same image again
    assert not out.exists() and not list(tmp_path.iterdir())
    with xh.open_h5_writer(str(out), layout) as writer:
        for stem, record in records.items():
            writer.add(stem, record)
    assert out.exists() and writer.count == 2


# --- X-LXMERT's reads, re-stated from x-lxmert/src/pretrain/lxmert_data.py (not through our reader) ----------


def consumer_grid_item(f, img_id, grid_size, feat_dim):
    feats = np.zeros(shape=(grid_size, grid_size, feat_dim), dtype=np.float32)
    f[f"{img_id}/features"].read_direct(feats)
    feats = np.reshape(feats, (grid_size**2, feat_dim))
    boxes = np.zeros(shape=(grid_size**2, 4), dtype=np.float32)
    for i in range(grid_size):
        for j in range(grid_size):
            boxes[i * grid_size + j] = (j / grid_size, i / grid_size, (j + 1) / grid_size, (i + 1) / grid_size)
    return feats, boxes


def consumer_boxes_item(f, img_id, n_boxes, feat_dim):
    feats = np.zeros(shape=(n_boxes, feat_dim), dtype=np.float32)
    f[f"{img_id}/features"].read_direct(feats)
    obj_id = np.zeros(shape=(n_boxes), dtype=int)
    f[f"{img_id}/obj_id"].read_direct(obj_id)
    img_h = f[f"{img_id}/img_h"][()]
    img_w = f[f"{img_id}/img_w"][()]
    boxes = f[f"{img_id}/boxes"][()]
    boxes[:, (0, 2)] /= img_w
    boxes[:, (1, 3)] /= img_h
    np.testing.assert_array_less(-boxes, 0 + 1e-5)
    return feats, obj_id, np.clip(boxes, 0.0, 1.0)


def test_xlxmert_loader_reads_our_files(tmp_path):
    datasets = tmp_path / "datasets"
    grids, boxes = grid_records(6, seed=1), boxes_records(6, seed=2)
    for kind, records in (("grid8", grids), ("boxes36", boxes)):
        layout = xh.Layout(kind, DIM)
        prefixes = write_parts(str(tmp_path / kind), records, layout, 2)
        xh.merge_parts(prefixes, str(datasets / xh.feature_file("coco", "train2014", kind=kind)), layout)
    encoder, grid_size = "maskrcnn", 8
    with h5py.File(datasets / f"COCO/features/{encoder}_train_grid{grid_size}.h5", "r") as f:
        for img_id, record in grids.items():
            feats, positions = consumer_grid_item(f, img_id, grid_size, DIM)
            for i in range(8):
                for j in range(8):
                    np.testing.assert_array_equal(feats[i * 8 + j], record["features"][i, j])
            np.testing.assert_array_equal(positions, xh.grid_boxes(8))
    clamped = 0
    with h5py.File(datasets / "COCO/features/maskrcnn_train_boxes36.h5", "r") as f:
        for img_id, record in boxes.items():
            feats, obj_id, norm = consumer_boxes_item(f, img_id, 36, DIM)
            np.testing.assert_array_equal(feats, record["features"])
            np.testing.assert_array_equal(obj_id, record["obj_id"])
            scale = np.array([record["img_w"], record["img_h"]] * 2, dtype=np.float64)
            np.testing.assert_allclose(norm, np.clip(record["boxes"] / scale, 0, 1), rtol=1e-6)
            clamped += int((record["boxes"][:, 2] > record["img_w"]).sum())
    assert clamped > 0  # the data has boxes past the image edge, which the loader clamps
