"""Hostile data inputs and readers (review ../shared/reviews/hostile-inputs.md, rows named in each test):
odd file names and links are listed as failed, paths from data files stay under their root, two images with
one id refuse the plan, and our readers meet garbage with one VlprepError naming the file."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlprep import VlprepError, shards
from vlprep.cli import main
from vlprep.data import image_paths
from vlprep.data import images as imgs
from vlprep.formats import volta_lmdb, volta_tsv
from vlprep.stages.regions.settings import VOLTA_DIR

TINY = ["--arch", "tiny", "--weights", "random:0", "--workers", "0"]
BAD_NAME = b"x_\xff\xfe.jpg"


def _copy_sample(sample: Path, folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, folder)) for p in sorted((sample / "images" / "val2014").iterdir())[:n]]


def _hostile_folder(sample: Path, folder: Path) -> None:
    """Two good images, a symlink loop (two links), a dangling link and a file whose name is not UTF-8."""
    good = _copy_sample(sample, folder)
    os.symlink("loop_b.jpg", folder / "loop_a.jpg")
    os.symlink("loop_a.jpg", folder / "loop_b.jpg")
    os.symlink("missing.jpg", folder / "dangling.jpg")
    shutil.copy(good[0], os.path.join(os.fsencode(folder), BAD_NAME))


def _reasons(markers: list[Path]) -> dict[str, str]:
    failed = [f for m in markers for f in json.loads(m.read_text(encoding="utf-8"))["failed"]]
    return {Path(f["item"]).name: f["error"] for f in failed}


def test_rows_1_14_1_16_links_and_non_utf8_name_are_listed_failed_regions(tmp_path, sample, capsys):
    _hostile_folder(sample, tmp_path / "imgs" / "val2014")
    out = tmp_path / "out"
    # --no-lmdb: the hostile names have no COCO image number (with an LMDB the plan refuses them, see test_guard)
    assert main(["regions", "extract", "--images", str(tmp_path / "imgs"), "--out", str(out), "--no-lmdb", *TINY]) == 0
    rows = list(volta_tsv.read_tsv(out / VOLTA_DIR / "val2014_obj36-36.tsv"))
    assert [r["img_id"] for r in rows] == ["COCO_val2014_000000000004", "COCO_val2014_000000000005"]
    plan = json.loads((out / "_work" / "regions" / "plan.json").read_text(encoding="utf-8"))
    assert len(plan["items"]) == 6
    reasons = _reasons(sorted((out / "_work" / "regions").glob("*.done.json")))
    assert reasons["loop_a.jpg"] == reasons["loop_b.jpg"] == "symlink loop"
    assert reasons["dangling.jpg"] == "dangling link to missing.jpg"
    assert reasons["x_\\xff\\xfe.jpg"].startswith(f"file name is not valid UTF-8 (bytes {BAD_NAME.hex()})")
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "x_\\xff\\xfe.jpg" in report and "dangling link to missing.jpg" in report


def test_row_1_16_non_utf8_name_is_listed_failed_context(tmp_path, sample):
    from vlprep import stage
    from vlprep.stages import context as C

    _hostile_folder(sample, tmp_path / "imgs")
    settings = C.make_settings(images=str(tmp_path / "imgs"), attributes=str(sample / "vg" / "attributes.json"),
                               relationships=str(sample / "vg" / "relationships.json"), weights="random:0",
                               model_cfg="tiny", index="flat", image_batch=2, text_batch=32)
    summary = C.run(str(tmp_path / "out"), settings, runtime=stage.Runtime(device="cpu", num_workers=0))
    assert summary["images"] == 2
    reasons = {Path(f["item"]).name: f["error"] for f in summary["failed"]}
    assert set(reasons) == {"loop_a.jpg", "loop_b.jpg", "dangling.jpg", "x_\\xff\\xfe.jpg"}
    assert "not valid UTF-8" in reasons["x_\\xff\\xfe.jpg"] and reasons["loop_a.jpg"] == "symlink loop"


def test_row_1_18_same_stem_twice_refuses_the_plan(tmp_path, sample, capsys):
    folder = tmp_path / "imgs" / "val2014"
    (good,) = _copy_sample(sample, folder, 1)
    Image.open(good).save(folder / good.with_suffix(".png").name)
    out = tmp_path / "out"
    assert main(["regions", "extract", "--images", str(tmp_path / "imgs"), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "vlprep: error: 1 image(s) have the same image id" in err
    assert f"{folder / good.name} and {folder / good.with_suffix('.png').name}" in err
    assert "Remove one of each pair, or pass a list file" in err
    assert not (out / "_work" / "regions" / "plan.json").exists()  # refused before any plan or extraction


def test_row_1_18_flickr_ids_shared_across_folders_refuse(tmp_path, sample):
    from vlprep.stages.regions import settings as regions_settings
    from vlprep.stages.regions.extract import check_ids

    items = [str(tmp_path / "a" / "1000092795.jpg"), str(tmp_path / "b" / "1000092795.jpg")]
    for lmdb in (True, False):  # every Flickr30k folder goes into the one flickr30k_obj36-36.tsv
        with pytest.raises(VlprepError, match="TSV row is keyed by its output split"):
            check_ids(items, regions_settings.Settings(images="x", dataset="flickr30k", lmdb=lmdb))
    coco = [str(tmp_path / "val2014" / "COCO_val2014_000000000009.jpg"),
            str(tmp_path / "train2014" / "COCO_val2014_000000000009.jpg")]
    with pytest.raises(VlprepError, match="coco LMDB is keyed by the image number"):
        check_ids(coco, regions_settings.Settings(images="x"))  # two TSVs, but one trainval LMDB
    check_ids(coco, regions_settings.Settings(images="x", lmdb=False))


def _karpathy(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"images": entries}))
    return path


@pytest.mark.parametrize("filepath,filename,row", [
    ("../../../../../../etc", "passwd", "5.5"),
    ("/etc", "passwd", "5.6"),
    ("../secret", "COCO_secret_000000000777.jpg", "5.7"),
    ("val2014", "../../secret/COCO_secret_000000000777.jpg", "5.7"),
])
def test_rows_5_5_5_6_5_7_karpathy_paths_leaving_the_root_are_refused(tmp_path, filepath, filename, row):
    root = tmp_path / "root"
    (root / "val2014").mkdir(parents=True)
    src = _karpathy(tmp_path / "trav.json", [{"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg"},
                                             {"filepath": filepath, "filename": filename}])
    with pytest.raises(VlprepError, match=r"1 image path\(s\) leave the image root .*images\[1\]"):
        imgs.list_images(str(src), str(root))


def test_row_5_7_traversal_refused_by_the_cli_and_never_opened(tmp_path, sample, capsys):
    root, secret = tmp_path / "root", tmp_path / "secret"
    _copy_sample(sample, root / "val2014", 1)
    secret.mkdir()
    shutil.copy(sorted((sample / "images" / "val2014").iterdir())[0], secret / "x.jpg")
    src = _karpathy(tmp_path / "trav.json", [{"filepath": "val2014", "filename": "COCO_val2014_000000000004.jpg"},
                                             {"filepath": "../secret", "filename": "x.jpg"}])
    out = tmp_path / "out"
    assert main(["regions", "extract", "--images", str(src), "--image-root", str(root), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "images[1] '../secret/x.jpg'" in err and "nothing was opened" in err
    assert not (out / VOLTA_DIR).exists()


def test_row_5_7_list_file_lines_stay_under_their_root(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    lst = root / "list.txt"
    lst.write_text("a/1.jpg\na/../a/2.jpg\n../outside/3.jpg\n")
    with pytest.raises(VlprepError, match=r"list.txt: 1 image path\(s\) leave .*line 3 '../outside/3.jpg'"):
        imgs.list_images(str(lst))
    lst.write_text("a/1.jpg\n/abs/4.jpg\ngs://bucket/5.jpg\n")  # absolute paths and URIs name their own place
    assert imgs.list_images(str(lst)) == sorted([str(root / "a/1.jpg"), "/abs/4.jpg", "gs://bucket/5.jpg"])
    other = tmp_path / "other"
    # with an image root, every line must lie under it: absolute ones and URIs too
    with pytest.raises(VlprepError, match=r"2 image path\(s\) leave .*line 2 '/abs/4.jpg'.*line 3 'gs://bucket/5.jpg'"):
        imgs.list_images(str(lst), str(other))
    lst.write_text(f"a/1.jpg\n{other}/b/6.jpg\n")
    assert imgs.list_images(str(lst), str(other)) == [str(other / "a/1.jpg"), str(other / "b/6.jpg")]


def test_repeated_paths_in_a_data_file_are_refused_not_collapsed(tmp_path):
    src = _karpathy(tmp_path / "k.json", [{"filepath": "val2014", "filename": "a.jpg"},
                                          {"filepath": "val2014/../val2014", "filename": "a.jpg"}])
    with pytest.raises(VlprepError, match=r"1 image\(s\) listed twice: images\[0\] and images\[1\]"):
        imgs.list_images(str(src), str(tmp_path))


def test_object_store_roots_refuse_dotdot_segments():
    assert image_paths.confine("gs://bucket/coco", "val2014/a.jpg") == "gs://bucket/coco/val2014/a.jpg"
    assert image_paths.confine("gs://bucket/coco", "val2014/../../x.jpg") is None
    assert image_paths.confine("s3://bucket/coco", "/etc/passwd") is None
    assert image_paths.confine("s3://bucket/coco", "a..b/c.jpg") == "s3://bucket/coco/a..b/c.jpg"


def test_symlinked_split_folders_under_the_root_are_followed(tmp_path, sample):
    # the operator's own layout (train2014 -> another disk) is not a data file's traversal
    _copy_sample(sample, tmp_path / "disk" / "val2014", 1)
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "disk" / "val2014", tmp_path / "root" / "val2014")
    src = _karpathy(tmp_path / "k.json", [{"filepath": "val2014", "filename": "COCO_val2014_000000000004.jpg"}])
    (uri,) = imgs.list_images(str(src), str(tmp_path / "root"))
    assert imgs.read_image(uri)[:2] == b"\xff\xd8"


def _captions(tmp_path: Path, entries: list[dict], dataset: str, capsys) -> tuple[int, str]:
    src = _karpathy(tmp_path / f"dataset_{dataset}.json", entries)
    rc = main(["captions", "--karpathy", str(src), "--dataset", dataset, "--out", str(tmp_path / "out")])
    return rc, capsys.readouterr().err


COCO_ENTRY = {"split": "train", "filename": "COCO_train2014_000000000009.jpg", "cocoid": 9, "sentences": [{"raw": "a"}]}


@pytest.mark.parametrize("second,what", [
    ({**COCO_ENTRY, "filename": "COCO_train2014_000000000010.jpg"}, "cocoid 9"),
    (dict(COCO_ENTRY), "cocoid 9"),
    ({**COCO_ENTRY, "cocoid": 10}, "filename 'COCO_train2014_000000000009.jpg'"),
])
def test_row_4_15_repeated_cocoid_or_entry_is_refused(tmp_path, capsys, second, what):
    rc, err = _captions(tmp_path, [COCO_ENTRY, {**COCO_ENTRY, "cocoid": 11, "filename": "b.jpg"}, second], "coco",
                        capsys)
    assert rc == 2 and f"1 image(s) listed twice: images[0] and images[2] ({what})" in err
    assert not (tmp_path / "out" / "train_ann.jsonl").exists()


def test_row_4_15_repeated_flickr_id_is_refused(tmp_path, capsys):
    entry = {"split": "train", "filename": "1000092795.jpg", "sentences": [{"raw": "a"}]}
    rc, err = _captions(tmp_path, [entry, {**entry, "split": "val"}], "flickr30k", capsys)
    assert rc == 2 and "images[0] and images[1] (image id '1000092795')" in err


def test_row_4_16_coco_file_read_as_flickr30k_is_refused(tmp_path, capsys):
    rc, err = _captions(tmp_path, [COCO_ENTRY], "flickr30k", capsys)
    assert rc == 2 and "images[0] has a 'cocoid': this is a COCO Karpathy file; use dataset coco" in err
    rc, err = _captions(tmp_path, [{"split": "train", "filename": "1.jpg", "sentences": []}], "coco", capsys)
    assert rc == 2 and "missing key 'cocoid' (a Flickr30k file? use dataset flickr30k)" in err


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


def test_row_5_2_torch_refusal_does_not_relay_weights_only_false(tmp_path):
    import torch

    from vlprep.models import weights

    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": _Evil()}}, path)
    with pytest.raises(VlprepError) as e:
        weights.load_checkpoint(path)
    msg = str(e.value)
    assert "refused by torch.load(weights_only=True)" in msg and "posix.system" in msg
    assert "weights_only=False" not in msg and "set to `False`" not in msg and "will likely succeed" not in msg


@pytest.mark.parametrize("where", ["value", "keys"])
def test_row_5_3_refused_pickle_in_an_lmdb_is_a_vlprep_error(tmp_path, where):
    import lmdb

    env = lmdb.open(str(tmp_path / "x.lmdb"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"keys", pickle.dumps(_Evil()) if where == "keys" else volta_lmdb.dumps([b"1"]))
        txn.put(b"1", pickle.dumps(_Evil()))
    env.close()
    with pytest.raises(VlprepError, match="refusing to unpickle global posix.system"):
        volta_lmdb.LmdbFeatureReader(tmp_path / "x.lmdb", feature_size=4).item(1)


def _record(img_id: str = "COCO_val2014_000000000001") -> dict:
    n = 2
    return {"img_id": img_id, "img_h": 10, "img_w": 12, "obj_ids": np.arange(n), "obj_conf": np.ones(n),
            "attr_ids": np.arange(n), "attr_conf": np.ones(n), "boxes": np.ones((n, 4)), "features": np.ones((n, 4)),
            "cls_prob": np.ones((n, 3)), "attr_prob": np.ones((n, 3))}


@pytest.fixture
def tsvs(tmp_path) -> dict[str, Path]:
    good = tmp_path / "good.tsv"
    volta_tsv.write_tsv(good, [_record(), _record("COCO_val2014_000000000002")])
    data = good.read_bytes()
    files = {"good": good, "random": np.random.default_rng(0).bytes(4000), "half": data[: len(data) // 4],
             "bad_int": data.replace(b"\t10\t12\t", b"\tten\t12\t", 1)}
    for name, content in files.items():
        if name != "good":
            files[name] = tmp_path / f"{name}.tsv"
            files[name].write_bytes(content)
    return files


@pytest.mark.parametrize("name,expect", [
    ("random", "is not TSV text"), ("half", "row 1 has .* fields, expected 13"), ("bad_int", "field img_h is 'ten'"),
])
def test_rows_5_10_5_11_read_tsv_garbage_is_one_error_naming_the_file(tsvs, name, expect):
    with pytest.raises(VlprepError, match=expect) as e:
        list(volta_tsv.read_tsv(tsvs[name]))
    assert str(tsvs[name]) in str(e.value)


def test_row_5_9_tsv_feature_reader_garbage_is_one_error_naming_the_file(tsvs, tmp_path):
    for name in ("random", "half"):
        with pytest.raises(VlprepError) as e:
            reader = volta_lmdb.TsvFeatureReader(tsvs[name], "coco", feature_size=4)
            reader[reader.keys()[0].decode()]
        assert str(tsvs[name]) in str(e.value)
    with pytest.raises(VlprepError, match="cannot read the TSV"):
        volta_lmdb.TsvFeatureReader(tmp_path / "missing.tsv", "coco")
    raw = bytearray(tsvs["good"].read_bytes())
    raw[raw.index(b"\r\n") + 40] = 0xFF  # the second row: its id reads, its features do not
    tsvs["good"].write_bytes(bytes(raw))
    reader = volta_lmdb.TsvFeatureReader(tsvs["good"], "coco", feature_size=4)
    assert reader[1][1] == 2
    with pytest.raises(VlprepError, match="the line of image 2 is corrupt"):
        reader.item(2)


def _one_done_shard(tmp_path: Path) -> tuple:
    spec = shards.plan(["a", "b"], 1, str(tmp_path / "work"))[0]
    calls = []

    def work(shard):
        calls.append(shard.index)
        shard.write_part("p.bin", b"data")
        return {"parts": ["p.bin"], "failed": []}

    shards.run_shard(spec, work, "t")
    return spec, Path(shards.load(spec).marker), calls, work


@pytest.mark.parametrize("row,corrupt", [
    ("2.14", lambda m: [1, 2]),
    ("2.15", lambda m: {**m, "parts": [{"name": "p.bin"}]}),
    ("2.15", lambda m: {**m, "parts": [{**m["parts"][0], "bytes": "4"}]}),
    ("2.15", lambda m: {**m, "parts": [{**m["parts"][0], "name": "../../p.bin"}]}),
    ("2.15", lambda m: {**m, "failed": "none"}),
])
def test_rows_2_14_2_15_marker_of_the_wrong_shape_is_redone(tmp_path, row, corrupt):
    spec, marker, calls, work = _one_done_shard(tmp_path)
    marker.write_text(json.dumps(corrupt(json.loads(marker.read_text()))))
    with pytest.raises(VlprepError, match="does not match its marker"):
        shards.collect(spec["plan"])
    assert shards.run_shard(spec, work, "t")["skipped"] is False and calls == [0, 0]
    assert shards.run_shard(spec, work, "t")["skipped"] is True
    marker.write_bytes(b"\xff\xfe not utf-8")
    assert shards.run_shard(spec, work, "t")["skipped"] is False


@pytest.mark.parametrize("values,scale", [(np.linspace(0, 1, 4096), 255.0), (np.linspace(0, 255, 4096), 1.0)])
def test_float_greys_are_scaled_not_clipped(values, scale):
    grey = values.astype(np.float32).reshape(64, 64)
    buf = io.BytesIO()
    Image.fromarray(grey, "F").save(buf, "TIFF")
    rgb, note = imgs.decode_rgb(buf.getvalue(), "g.tif")
    assert note == "converted from F"
    np.testing.assert_array_equal(rgb[..., 1], np.clip(np.rint(grey * scale), 0, 255).astype(np.uint8))
    assert 120 < rgb.mean() < 135


def test_32_bit_greys_above_16_bits_are_scaled_by_their_maximum():
    grey = (np.arange(4096, dtype=np.int32).reshape(64, 64) * 1000)  # up to 4 095 000
    buf = io.BytesIO()
    Image.fromarray(grey, "I").save(buf, "TIFF")
    rgb, _ = imgs.decode_rgb(buf.getvalue(), "g.tif")
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and 120 < rgb.mean() < 135


def _h5_readers(tmp_path: Path):
    """(the file it reads, a call that reads it) for each reader of our HDF5 formats."""
    from vlprep.formats import ctx_h5, region_h5, vokens, xlxmert_h5

    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "coco.path").write_text("a.jpg\n")
    (keys / "coco.ids").write_text("a\n")
    return [
        (tmp_path / "r.h5", lambda p: next(region_h5.read_region_h5(p))),
        (tmp_path / "x.h5", lambda p: xlxmert_h5.XlxmertH5Reader(p)),
        (tmp_path / "vis_ctx.hdf5", lambda p: ctx_h5.read_vis_ctx(p)),
        (tmp_path / "txt_ctx.hdf5", lambda p: ctx_h5.read_txt_ctx(p)),
        (keys / "coco.hdf5", lambda p: vokens.read_keys(str(keys), "coco")),
    ]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_hdf5_readers_name_a_garbage_or_truncated_file(tmp_path, damage):
    import h5py

    for path, read in _h5_readers(tmp_path):
        with h5py.File(path, "w") as f:  # a real HDF5 of some size, then damaged
            f.create_dataset("keys", data=np.zeros((64, 64), np.float32))
        data = path.read_bytes()
        path.write_bytes(os.urandom(len(data)) if damage == "garbage" else data[: len(data) // 3])
        with pytest.raises(VlprepError, match=rf"{re.escape(path.name)}: cannot open the .*HDF5.*rerun"):
            read(path)
