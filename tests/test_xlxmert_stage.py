"""The X-LXMERT stage on the bundled sample (tiny X-152, random weights): grid8 / boxes36 HDF5s in
X-LXMERT's names and layout, shard-count invariance, resume, the visual vocabulary against upstream's
method, the reports and the CLI's errors."""

from __future__ import annotations

import io
import shutil
from pathlib import Path, PurePosixPath

import faiss
import h5py
import numpy as np
import pytest

from vlprep import VlprepError, stage
from vlprep.data.images import decode_bgr, list_images
from vlprep.formats import clusters
from vlprep.formats.xlxmert_h5 import XlxmertH5Reader
from vlprep.sample import sample_dir
from vlprep.stages import xlxmert

# one image per call where files are compared byte for byte: batched results differ in the last bits, CPU-dependently
CPU = stage.Runtime(device="cpu", batch_size=1, num_workers=0)
TRAIN, VALID = "COCO/features/maskrcnn_train_grid8.h5", "COCO/features/maskrcnn_valid_grid8.h5"


def _settings(**kw) -> xlxmert.Settings:
    return xlxmert.Settings(images=str(Path(sample_dir()) / "images"), arch="tiny", **kw)


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """grid8 of the six sample images in three shards."""
    out = tmp_path_factory.mktemp("grid")
    xlxmert.run(str(out), _settings(), num_shards=3, runtime=CPU)
    return out


@pytest.fixture(scope="module")
def vocab(grid, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of ``grid`` with an 8-word vocabulary trained on mscoco_train, assigned in two shards."""
    out = tmp_path_factory.mktemp("vocab") / "out"
    shutil.copytree(grid, out)
    summary = xlxmert.run_vocabulary(str(out), xlxmert.VocabSettings(k=8, dim=0), num_shards=2, runtime=CPU)
    return out, summary


def test_grid_files_hold_the_detectors_features_per_file_stem(grid):
    from vlprep.models.detection.x152 import load_x152

    model = load_x152("random:0", arch="tiny")
    images = list_images(str(Path(sample_dir()) / "images"))
    for name, folder in ((TRAIN, "train2014"), (VALID, "val2014")):
        uris = [u for u in images if PurePosixPath(u).parent.name == folder]
        with XlxmertH5Reader(grid / name) as reader:
            assert reader.keys() == sorted(PurePosixPath(u).stem for u in uris)
            assert reader.layout.kind == "grid8" and reader.layout.dim == model.cfg.mlp_dim
            for uri in uris:
                image, _ = decode_bgr(Path(uri).read_bytes(), uri, exif=False)
                want = model.extract([image], "grid8")[0]["features"]
                np.testing.assert_allclose(reader[PurePosixPath(uri).stem]["features"], want, rtol=1e-4, atol=1e-4)
        with h5py.File(grid / name, "r") as f:  # X-LXMERT's layout: only `features`, contiguous, uncompressed
            group = f[next(iter(f))]
            assert list(group) == ["features"] and group["features"].compression is None


def test_shard_count_does_not_change_the_files_and_reruns_skip(grid, tmp_path):
    one = tmp_path / "one"
    xlxmert.run(str(one), _settings(), num_shards=1, runtime=CPU)
    for name in (TRAIN, VALID):
        assert (one / name).read_bytes() == (grid / name).read_bytes()
    again = xlxmert.run(str(one), _settings(), num_shards=1, runtime=CPU)
    assert again["skipped_shards"] == 1 and (one / TRAIN).read_bytes() == (grid / TRAIN).read_bytes()
    # other weights: the shard's fingerprint differs, so it is redone
    other = xlxmert.run(str(one), _settings(weights="random:1"), num_shards=1, runtime=CPU)
    assert other["skipped_shards"] == 0 and other["random_weights"] is True
    with XlxmertH5Reader(one / TRAIN) as new, XlxmertH5Reader(grid / TRAIN) as old:
        stem = new.keys()[0]
        assert not np.allclose(new[stem]["features"], old[stem]["features"])


def test_boxes36_files_and_report(tmp_path):
    out = tmp_path / "boxes"
    batched = stage.Runtime(device="cpu", batch_size=4, num_workers=1)  # size buckets and a decode worker
    summary = xlxmert.run(str(out), _settings(kind="boxes36"), num_shards=2, runtime=batched)
    assert sorted(summary["names"]) == ["mscoco_train", "mscoco_valid"]
    sizes = {PurePosixPath(u).stem: decode_bgr(Path(u).read_bytes(), u)[0].shape[:2]
             for u in list_images(str(Path(sample_dir()) / "images"))}
    for name in ("COCO/features/maskrcnn_train_boxes36.h5", "COCO/features/maskrcnn_valid_boxes36.h5"):
        with XlxmertH5Reader(out / name) as reader:
            assert reader.layout.kind == "boxes36" and len(reader) == 3
            for stem in reader:
                r = reader[stem]
                assert (r["img_h"], r["img_w"]) == sizes[stem]
                assert r["features"].shape == (36, 32) and r["boxes"].shape == (36, 4)
                assert r["obj_id"].dtype == np.int64 and 0 <= r["obj_id"].min() and r["obj_id"].max() < 20
                # boxes in original pixels (not normalised): they reach well beyond 1
                assert r["boxes"].max() > 50
    html = (out / "xlxmert_boxes36_report.html").read_text()
    assert "RANDOM weights" in html and html.count("<img src='data:image/png;base64,") == 4
    assert "36 boxes" in html


def test_grid_report_and_imsize_names(grid):
    html = (grid / "xlxmert_grid8_report.html").read_text()
    assert html.count("<img src='data:image/png;base64,") == 4 and "8x8 grid" in html
    assert TRAIN in html and "RANDOM weights" in html
    assert _settings(imsize=448).feature_file("train2014") == "COCO/features/maskrcnn_train_grid8_imsize448.h5"
    assert _settings(dataset="vg").feature_file("all") == "VG/features/maskrcnn_grid8.h5"
    assert _settings(dataset="nlvr2").feature_file("dev") == "nlvr2/features/maskrcnn_valid_v4_grid8.h5"


def test_plan_refuses_what_x_lxmert_cannot_name(tmp_path):
    folder = tmp_path / "imgs" / "misc"
    folder.mkdir(parents=True)
    src = next(Path(sample_dir(), "images", "train2014").glob("*.jpg"))
    shutil.copy(src, folder / "a.jpg")
    with pytest.raises(VlprepError, match=r"misc/a\.jpg.*unknown split 'misc'"):
        xlxmert.plan(str(tmp_path / "o"), xlxmert.Settings(images=str(tmp_path / "imgs"), arch="tiny"))
    # VG has one file for every folder: the same stem twice would be one HDF5 group
    (tmp_path / "imgs" / "other").mkdir()
    shutil.copy(src, tmp_path / "imgs" / "other" / "a.jpg")
    with pytest.raises(VlprepError, match="same file stem 'a'"):
        xlxmert.plan(str(tmp_path / "o"), xlxmert.Settings(images=str(tmp_path / "imgs"), dataset="vg"))
    with pytest.raises(VlprepError, match="imsize 448: only grid8"):
        xlxmert.plan(str(tmp_path / "o"), _settings(kind="boxes36", imsize=448))
    with pytest.raises(VlprepError, match="kind 'grid4'"):
        xlxmert.plan(str(tmp_path / "o"), _settings(kind="grid4"))


def _cells(path: Path) -> tuple[list[str], np.ndarray]:
    """Upstream's load_data: every group in h5py order, [N*64, D]."""
    with h5py.File(path, "r") as f:
        keys = list(f)
        return keys, np.concatenate([f[k]["features"][()].reshape(64, -1) for k in keys])


def test_vocabulary_is_upstreams_kmeans_and_assignment(vocab):
    out, summary = vocab
    v = clusters.Vocabulary(src="mscoco_train", k=8, niter=20, dim=32)
    centroids = clusters.read_centroids(str(out / v.centroids_file()), v)
    _, src = _cells(out / TRAIN)
    km = faiss.Kmeans(32, 8, niter=20, seed=1234)  # upstream's call (faiss defaults otherwise)
    km.train(src)
    np.testing.assert_allclose(centroids, km.centroids, rtol=1e-5, atol=1e-5)
    # where X-LXMERT's image generator opens them (image_generator/src/main.py: ../datasets/cluster_centroids/)
    assert v.generator_centroids_file() == "cluster_centroids/maskrcnn_mscoco_train_centroids8_iter20_d32_grid8.npy"
    assert (out / v.generator_centroids_file()).read_bytes() == (out / v.centroids_file()).read_bytes()
    for tgt, path in (("mscoco_train", TRAIN), ("mscoco_valid", VALID)):
        keys, x = _cells(out / path)
        index = faiss.IndexFlatL2(32)
        index.add(centroids)
        _, want = index.search(x, 1)
        got = np.load(out / v.cluster_index_file(tgt))
        assert got.dtype == np.int64 and got.shape == (len(keys) * 64, 1)
        np.testing.assert_array_equal(got, want)
        mapping = clusters.read_cluster_map(str(out / v.cluster_map_file(tgt)))
        assert list(mapping) == keys
        np.testing.assert_array_equal(np.concatenate([mapping[k] for k in keys]), want[:, 0])
        assert summary["targets"][tgt] == {"images": 3, "cells": 192}


def test_assignment_shards_and_resume(vocab):
    out, _ = vocab
    v = clusters.Vocabulary(src="mscoco_train", k=8, niter=20, dim=32)
    before = {t: (out / v.cluster_index_file(t)).read_bytes() for t in ("mscoco_train", "mscoco_valid")}
    again = xlxmert.run_vocabulary(str(out), xlxmert.VocabSettings(k=8, dim=0), num_shards=2, runtime=CPU)
    assert again["kmeans_skipped"] is True and again["skipped_shards"] == 2
    # one image per block, five shards: blocks span targets and shards cut them anywhere
    specs = xlxmert.assign_plan(str(out), num_shards=5, block=1)
    assert len(specs) == 5
    markers = [xlxmert.assign(s, CPU) for s in specs]
    assert not any(m["skipped"] for m in markers) and sum(sum(m["targets"].values()) for m in markers) == 6
    xlxmert.assign_merge(str(out))
    for t, data in before.items():
        assert (out / v.cluster_index_file(t)).read_bytes() == data


def test_clusters_report(vocab):
    out, summary = vocab
    html = (out / "xlxmert_clusters_report.html").read_text()
    assert summary["report"] == str(out / "xlxmert_clusters_report.html")
    assert "RANDOM weights" in html and "K=8" in html
    assert html.count("<img src='data:image/png;base64,") == 6  # the 6 largest of 8 clusters, their cells side by side
    assert html.count("cells per cluster") == 2  # one histogram per target
    assert "192 cells in" in html


def test_vocabulary_from_named_files_and_errors(vocab, tmp_path):
    out, _ = vocab
    features = (f"coco_val={out / VALID}", "mscoco_train")  # a path, and an upstream name resolved under out
    summary = xlxmert.run_vocabulary(str(out), xlxmert.VocabSettings(features=features, src="coco_val", k=4, dim=32,
                                                                     niter=5, images=str(Path(sample_dir(), "images"))),
                                     runtime=CPU)
    assert summary["vocabulary"]["src"] == "coco_val"
    v = clusters.Vocabulary(src="coco_val", k=4, niter=5, dim=32)
    assert (out / v.cluster_map_file("mscoco_train")).exists() and (out / v.centroids_file()).exists()
    with pytest.raises(VlprepError, match="source 'vg' is not among the features"):
        xlxmert.kmeans(str(out), xlxmert.VocabSettings(features=("mscoco_train",), src="vg", k=4, dim=32))
    with pytest.raises(VlprepError, match="dim=2048"):
        xlxmert.kmeans(str(out), xlxmert.VocabSettings(k=4))
    with pytest.raises(VlprepError, match="no grid8 extraction here"):
        xlxmert.kmeans(str(tmp_path), xlxmert.VocabSettings(k=4))
    with pytest.raises(VlprepError, match="k-means k=0"):
        xlxmert.kmeans(str(out), xlxmert.VocabSettings(k=0))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from vlprep.cli import main

    assert main(["xlxmert", "kmeans", "--out", str(tmp_path), "--features", f"a={tmp_path / 'a.h5'}",
                 "--src", "b"]) == 2
    assert "--src b: not among --features" in capsys.readouterr().err
    assert main(["xlxmert", "extract", "--images", str(tmp_path), "--weights", "random:0", "--out",
                 str(tmp_path / "o"), "--arch", "tiny"]) == 2
    assert "no .jpg/.jpeg/.png files found" in capsys.readouterr().err


def test_on_gcs_the_same_files(gcs, grid, vocab, tmp_path):
    """The whole workflow with out=gs:// (the emulator): HDF5s, centroids and cluster ids equal the local run's."""
    from vlprep import storage

    xlxmert.run(gcs, _settings(), num_shards=2, runtime=CPU)
    for name in (TRAIN, VALID):
        assert storage.read_bytes(storage.join(gcs, name)) == (grid / name).read_bytes()
    summary = xlxmert.run_vocabulary(gcs, xlxmert.VocabSettings(k=8, dim=0), num_shards=2, runtime=CPU)
    assert summary["targets"]["mscoco_valid"] == {"images": 3, "cells": 192}
    v = clusters.Vocabulary(src="mscoco_train", k=8, niter=20, dim=32)
    out, _ = vocab
    for rel in (v.cluster_index_file("mscoco_valid"), v.centroids_file()):
        np.testing.assert_array_equal(np.load(io.BytesIO(storage.read_bytes(storage.join(gcs, rel)))), np.load(out / rel))
    assert "cells per cluster" in storage.read_text(storage.join(gcs, "xlxmert_clusters_report.html"))
