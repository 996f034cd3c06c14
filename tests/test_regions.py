"""Region-feature stage: shard invariance, resume after a kill, reruns with other settings, bad images, LMDB,
hard negatives, gs://."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from vlprep import shards, stage, storage
from vlprep.formats import volta_lmdb, volta_tsv
from vlprep.stages import captions, regions

# the folders the consumers open (restated here, not imported): VOLTA's configs
# <dataroot>/resnet101_faster_rcnn_genome_imgfeats/volta/*_feat.lmdb, LXMERT's data/mscoco_imgfeat/
VOLTA = "resnet101_faster_rcnn_genome_imgfeats"
LXMERT = Path("lxmert", "data", "mscoco_imgfeat")
RUNTIME = stage.Runtime(device="cpu", batch_size=4, num_workers=0)


def settings(images, **kw) -> regions.Settings:
    return regions.Settings(images=str(images), **{"arch": "tiny", "weights": "random:0", **kw})


@pytest.fixture(scope="module")
def detector():
    """The tiny detector, loaded once for the module (the stage keeps one per process)."""
    return regions.detector_for(settings("unused"), RUNTIME)


def _run(images, out, n, detector, runtime=RUNTIME, **kw):
    for spec in regions.plan(str(out), settings(images, **kw), num_shards=n):
        regions.extract(spec, runtime)
    return regions.merge(str(out))


def _captions(karpathy, out, dataset="coco"):
    captions.run(str(out), captions.Settings(karpathy=str(karpathy), dataset=dataset))


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tsv")) if "_work" not in p.parts}


def test_merged_output_identical_whatever_the_shard_count(tmp_path, sample, detector):
    # one image per model call: which images share a batch changes with the shard count, and batching is
    # bitwise-neutral only on CPUs whose conv kernels are (test_butd probes that); here the merge is tested
    single = stage.Runtime(device="cpu", batch_size=1, num_workers=0)
    one = _run(sample / "images", tmp_path / "n1", 1, detector, runtime=single)
    three = _run(sample / "images", tmp_path / "n3", 3, detector, runtime=single)
    a, b = _tree(tmp_path / "n1"), _tree(tmp_path / "n3")
    # where the consumers open them: LXMERT src/tasks/vqa_data.py and src/pretrain/lxmert_data.py
    # ("data/mscoco_imgfeat/%s_obj36.tsv"), VOLTA data/mscoco/convert_coco_lmdb.py (indir + "train2014_obj36-36.tsv")
    assert sorted(a) == [f"{LXMERT.as_posix()}/train2014_obj36.tsv", f"{LXMERT.as_posix()}/val2014_obj36.tsv",
                         "resnet101_faster_rcnn_genome_imgfeats/train2014_obj36-36.tsv", "resnet101_faster_rcnn_genome_imgfeats/val2014_obj36-36.tsv"]
    assert a == b
    assert one["images"] == three["images"] == 6
    rows = list(volta_tsv.read_tsv(tmp_path / "n1" / VOLTA / "train2014_obj36-36.tsv"))
    assert [r["img_id"] for r in rows] == [f"COCO_train2014_{i:012d}" for i in (1, 2, 3)]
    assert all(r["num_boxes"] == 36 and r["boxes"].shape == (36, 4) for r in rows)
    lx = (tmp_path / "n1" / LXMERT / "train2014_obj36.tsv").read_text().splitlines()[0].split("\t")
    assert len(lx) == 10


def test_killed_shard_rerun_gives_identical_output_without_duplicates(tmp_path, sample, detector):
    clean = tmp_path / "clean"
    _run(sample / "images", clean, 2, detector)
    out = tmp_path / "killed"
    specs = regions.plan(str(out), settings(sample / "images"), num_shards=2)
    regions.extract(specs[0], RUNTIME)
    # shard 1 died half-way: a partial part, no marker
    part = shards.load(specs[1]).part("features.npy")
    storage.write_bytes(part, (clean / VOLTA / "val2014_obj36-36.tsv").read_bytes()[:5000])
    with pytest.raises(Exception, match="shard 1 of 2 has no done-marker"):
        regions.merge(str(out))
    for spec in specs:  # the retry: shard 0 is skipped, shard 1 redone
        m = regions.extract(spec, RUNTIME)
        assert m["skipped"] is (spec["index"] == 0)
    regions.merge(str(out))
    assert _tree(out) == _tree(clean)


def _bad_images(tmp_path: Path, sample: Path) -> Path:
    root = tmp_path / "imgs" / "val2014"
    root.mkdir(parents=True)
    src = sample / "images" / "train2014" / "COCO_train2014_000000000001.jpg"
    good = src.read_bytes()
    (root / "COCO_val2014_000000000011.jpg").write_bytes(good)
    (root / "COCO_val2014_000000000012.jpg").write_bytes(b"")  # zero bytes
    (root / "COCO_val2014_000000000013.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (root / "COCO_val2014_000000000014.jpg").write_bytes(b"<html>not an image</html>")  # corrupt
    im = Image.open(io.BytesIO(good))
    buf = io.BytesIO()
    im.convert("CMYK").save(buf, "JPEG")
    (root / "COCO_val2014_000000000015.jpg").write_bytes(buf.getvalue())  # CMYK
    buf = io.BytesIO()
    im.convert("L").save(buf, "JPEG")
    (root / "COCO_val2014_000000000016.jpg").write_bytes(buf.getvalue())  # grayscale
    buf = io.BytesIO()
    im.save(buf, "PNG")
    (root / "COCO_val2014_000000000017.jpg").write_bytes(buf.getvalue())  # PNG named .jpg
    return tmp_path / "imgs"


def test_bad_images_are_skipped_and_listed_never_a_crash(tmp_path, sample, detector):
    images = _bad_images(tmp_path, sample)
    out = tmp_path / "out"
    summary = _run(images, out, 2, detector)
    failed = {Path(f["item"]).name: f["error"] for f in summary["failed"]}
    assert sorted(failed) == [f"COCO_val2014_0000000000{i}.jpg" for i in (12, 13, 14)]
    assert "zero-byte" in failed["COCO_val2014_000000000012.jpg"]
    rows = list(volta_tsv.read_tsv(out / VOLTA / "val2014_obj36-36.tsv"))
    assert [r["img_id"][-2:] for r in rows] == ["11", "15", "16", "17"]
    notes = {Path(n["item"]).name: n["note"] for n in summary["notes"]}
    assert "CMYK" in notes["COCO_val2014_000000000015.jpg"] and "PNG data" in notes["COCO_val2014_000000000017.jpg"]
    # the markers list them too, and the report names them
    markers = [json.loads(p.read_text()) for p in (out / "_work" / "regions").glob("*.done.json")]
    assert sum(len(m["failed"]) for m in markers) == 3
    assert "COCO_val2014_000000000013.jpg" in (out / "report.html").read_text()


def test_lmdb_and_hard_negatives_as_volta_reads_them(tmp_path, sample, detector):
    out = tmp_path / "mscoco"
    _run(sample / "images", out, 2, detector)
    built = regions.lmdb(str(out))["lmdb"]
    assert list(built.values()) == [6]
    db = out / VOLTA / "volta" / "trainval_feat.lmdb"
    env = lmdb.open(str(db), max_readers=1, readonly=True, lock=False, readahead=False,
                    meminit=False)
    with env.begin(write=False) as txn:
        keys = pickle.loads(txn.get(b"keys"))
        assert keys == [b"1", b"2", b"3", b"4", b"5", b"6"]  # train2014 then val2014
        item = pickle.loads(txn.get(b"4"))
        assert all(isinstance(v, str) for v in item.values()) and list(item)[0] == "img_id"
    env.close()
    tsv = {r["img_id"]: r for r in volta_tsv.read_tsv(out / VOLTA / "val2014_obj36-36.tsv")}
    with volta_lmdb.LmdbFeatureReader(db, feature_size=tsv["COCO_val2014_000000000004"]
                                      ["features"].shape[1], num_locs=5, add_global_imgfeat="first") as reader:
        feats, n, spatials, _ = reader[4]
    np.testing.assert_array_equal(feats[1:], tsv["COCO_val2014_000000000004"]["features"])
    assert n == 37 and spatials.shape == (37, 5)
    _captions(sample / "dataset_coco.json", out / "annotations")
    hn = regions.hard_negatives(str(out), str(out / "annotations"))
    pool = pickle.loads((out / "hard_negative.pkl").read_bytes())
    assert pool["train_image_list"] == [1, 2, 3] and hn["train_images"] == 3
    assert [row[0] for row in np.asarray(pool["train_hard_pool"])] == [0, 1, 2]


def test_missing_annotations_for_hard_negatives(tmp_path, sample):
    regions.plan(str(tmp_path), settings(sample / "images"))
    with pytest.raises(Exception, match="run the captions stage first"):
        regions.hard_negatives(str(tmp_path), str(tmp_path / "annotations"))


def test_to_object_storage(gcs, sample, detector):
    summary = _run(sample / "images", gcs, 2, detector)
    assert f"{gcs}/resnet101_faster_rcnn_genome_imgfeats/train2014_obj36-36.tsv" in summary["files"]
    built = regions.lmdb(gcs)["lmdb"]
    assert built == {f"{gcs}/resnet101_faster_rcnn_genome_imgfeats/volta/trainval_feat.lmdb": 6}
    assert f"{gcs}/resnet101_faster_rcnn_genome_imgfeats/volta/trainval_feat.lmdb/data.mdb" in storage.list_prefix(gcs)


def test_cli_formats(tmp_path, sample, capsys):
    from vlprep.cli import main

    images = tmp_path / "imgs"
    shutil.copytree(sample / "images" / "val2014", images / "val2014")
    rc = main(["regions", "extract", "--images", str(images), "--out", str(tmp_path / "o"), "--arch", "tiny",
               "--format", "h5,lxmert-tsv", "--workers", "0", "--recipe", "d2-maxnms36", "--no-lmdb",
               "--weights", "random:0"])
    assert rc == 0
    assert (tmp_path / "o" / "h5" / "val2014_obj36-36.h5").exists()
    assert (tmp_path / "o" / LXMERT / "val2014_obj36.tsv").exists()
    assert not (tmp_path / "o" / VOLTA).exists()
    assert main(["regions", "extract", "--images", str(images), "--out", str(tmp_path / "p"), "--recipe", "nope",
                 "--arch", "tiny"]) == 2
    assert "unknown BUTD recipe 'nope'" in capsys.readouterr().err


def test_flickr30k_ids_lmdb_and_hard_negatives(tmp_path, sample, detector):
    folder = tmp_path / "flickr30k_images"
    folder.mkdir()
    for i, src in enumerate(sorted((sample / "images").rglob("*.jpg"))[:4]):
        shutil.copy(src, folder / f"{1000092795 + i}.jpg")
    out = tmp_path / "flickr30k"
    _run(folder, out, 2, detector, dataset="flickr30k")
    # VOLTA data/flickr30k/convert_flickr30k_lmdb.py opens indir + "flickr30k_obj36-36.tsv" (--split flickr30k),
    # whatever the image folder is called; its configs open <dataroot>/<VOLTA>/volta/flickr30k_feat.lmdb
    rows = list(volta_tsv.read_tsv(out / VOLTA / "flickr30k_obj36-36.tsv"))
    assert (out / "lxmert" / "data" / "flickr30k_imgfeat" / "flickr30k_obj36.tsv").exists()
    assert [r["img_id"] for r in rows] == [str(1000092795 + i) for i in range(4)]
    assert regions.lmdb(str(out))["lmdb"] == {str(out / VOLTA / "volta" / "flickr30k_feat.lmdb"): 4}
    karpathy = tmp_path / "dataset_flickr30k.json"
    karpathy.write_text(json.dumps({"images": [
        {"split": "train", "filename": f"{1000092795 + i}.jpg", "sentences": [{"raw": f"photo {i}"}]}
        for i in (2, 0, 3)]}))
    _captions(karpathy, out / "annotations", "flickr30k")
    regions.hard_negatives(str(out), str(out / "annotations"))
    pool = pickle.loads((out / "hard_negative.pkl").read_bytes())
    assert pool["train_image_list"] == [1000092797, 1000092795, 1000092798]  # train-jsonl order


def test_rerun_with_other_weights_redoes_the_shards(tmp_path, sample, detector):
    """Other weights (or recipe, parameters, architecture, autocast) must never reuse a shard made with
    the old ones; a merge-time change (the formats) reuses them."""
    out = tmp_path / "out"
    _run(sample / "images", out, 2, detector)
    first = _tree(out)
    specs = regions.plan(str(out), settings(sample / "images", weights="random:1"), num_shards=2)
    assert [regions.extract(s, RUNTIME)["skipped"] for s in specs] == [False, False]
    regions.merge(str(out))
    other = _tree(out)
    assert sorted(other) == sorted(first) and all(other[k] != first[k] for k in first)
    clean = tmp_path / "clean"
    _run(sample / "images", clean, 1, detector, weights="random:1")
    assert _tree(clean) == other
    specs = regions.plan(str(out), settings(sample / "images", weights="random:1", formats="lxmert-tsv"), num_shards=2)
    assert [regions.extract(s, RUNTIME)["skipped"] for s in specs] == [True, True]
    markers = [json.loads(p.read_text()) for p in (out / "_work" / "regions").glob("*.done.json")]
    assert {m["fingerprint"] for m in markers} == {settings("x", weights="random:1").fingerprint()}


def test_split_group_reaches_the_plan(tmp_path, sample):
    from vlprep.cli import main

    out = tmp_path / "o"
    assert main(["regions", "extract", "--images", str(sample / "images"), "--out", str(out), "--arch", "tiny",
                 "--workers", "0", "--shards", "4", "--split", "group", "--no-lmdb", "--format", "lxmert-tsv",
                 "--weights", "random:0"]) == 0
    plan = json.loads((out / "_work" / "regions" / "plan.json").read_text())
    assert plan["split"] == "group" and plan["bounds"] == [[0, 1], [1, 2], [2, 3], [3, 6]]  # upstream's rule


def test_hard_negatives_on_thousands_of_images_read_features_once(tmp_path):
    """3000 images (parts written by the stage's own writer): one pass, the exact pool."""
    n, rng = 3000, np.random.default_rng(0)
    uris = [f"/data/train2014/COCO_train2014_{i:012d}.jpg" for i in range(1, n + 1)]
    out = tmp_path / "mscoco"
    specs = regions.STAGE.start(str(out), settings("unused", annotations=str(tmp_path / "ann"))).plan(uris, num_shards=3)
    feats = rng.normal(size=(n, 2, 8)).astype(np.float32)

    def synthetic(shard, work):
        results = [(u, {"num_boxes": 2, "image_h": 4, "image_w": 4, "features": feats[uris.index(u)],
                        "boxes": np.zeros((2, 4), np.float32)}) for u in shard.items]
        return {"parts": regions.write_results(shard, results), "failed": []}

    for spec in specs:
        regions.STAGE.run_shard(spec, synthetic)
    order = rng.permutation(n)[: n - 5] + 1  # train-jsonl order; 5 images have no annotation
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "train_ann.jsonl").write_text("".join(json.dumps({"id": int(i)}) + "\n" for i in order))
    summary = regions.hard_negatives(str(out))
    assert summary["train_images"] == n - 5 and summary["missing_features"] == 0 and summary["pool_size"] == 100
    pool = pickle.loads((out / "hard_negative.pkl").read_bytes())
    assert pool["train_image_list"] == [int(i) for i in order]
    means = feats.sum(axis=1) / 2
    x = means[order - 1].astype(np.float64)
    for row in (0, 17, n - 6):
        dist = ((x - x[row]) ** 2).sum(axis=1)
        dist[row] = -1
        assert np.array_equal(np.asarray(pool["train_hard_pool"])[row], np.argsort(dist, kind="stable")[:100])
