"""Cross-modal context stage (Xmodal-Ctx / HAAV) on the sample: layouts, shard invariance, resume, bad images,
index parameters, retrieval against brute force, components and the local pipeline run.

Random weights and tiny CLIP configs of the real architecture keep it fast; the layouts are the recipe's
with the tiny model's widths (64-d visual context, 32-d keys/values) instead of 768/512.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from vlprep import VlprepError, index, stage
from vlprep.data import ids as image_ids
from vlprep.data import visual_genome as vg
from vlprep.formats import ctx_h5
from vlprep.stages import context as C

OUTPUTS = [C.VIS_CTX, C.TXT_CTX, C.CAPTION_DB, C.FAISS_INDEX, C.PHRASES]
COMMON = dict(weights="random:0", model_cfg="tiny", index="flat", image_batch=2, text_batch=32)
CPU = stage.Runtime(device="cpu", num_workers=0)


def vg_files(sample: Path) -> tuple[str, str]:
    return str(sample / "vg" / "attributes.json"), str(sample / "vg" / "relationships.json")


def settings(sample: Path, images: str | None = None, **kw) -> C.Settings:
    attributes, relationships = vg_files(sample)
    return C.make_settings(images=images or str(sample / "images"), attributes=attributes,
                           relationships=relationships, **{**COMMON, **kw})


def run(sample: Path, out, images: str | None = None, num_workers: int = 0, image_shards: int = 1,
        phrase_shards: int = 1, **kw) -> dict:
    return C.run(str(out), settings(sample, images, **kw), image_shards=image_shards, phrase_shards=phrase_shards,
                 runtime=stage.Runtime(device="cpu", num_workers=num_workers))


def same_bytes(a: Path, b: Path, names=OUTPUTS) -> list[str]:
    return [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]


@pytest.fixture(scope="module")
def one(tmp_path_factory, sample) -> tuple[Path, dict]:
    """The stage on the sample in one shard per fan-out (XC recipe)."""
    out = tmp_path_factory.mktemp("ctx1")
    return out, run(sample, out, num_workers=0)


@pytest.fixture(scope="module")
def three(tmp_path_factory, sample) -> tuple[Path, dict]:
    """The same in three shards per fan-out, images decoded by two DataLoader workers."""
    out = tmp_path_factory.mktemp("ctx3")
    return out, run(sample, out, image_shards=3, phrase_shards=3, num_workers=2)


def test_xc_layouts(one, sample):
    out, summary = one
    assert summary["images"] == 6 and summary["failed"] == [] and summary["random_weights"]
    phrases = vg.build_phrases(*vg_files(sample))
    assert (out / C.PHRASES).read_text(encoding="utf-8") == "".join(p + "\n" for p in phrases)
    assert summary["phrases"] == len(phrases) == 141

    # vis_ctx.hdf5 (spec 1.8, XC): root attr fdim; one uncompressed float32 dataset per image, named by id
    with h5py.File(out / C.VIS_CTX, "r") as f:
        assert dict(f.attrs) == {"fdim": 64}
        assert sorted(f.keys(), key=int) == ["1", "2", "3", "4", "5", "6"]
        for ds in f.values():
            assert isinstance(ds, h5py.Dataset) and ds.shape == (64,) and ds.dtype == np.float32
            assert ds.compression is None
    assert ctx_h5.vis_ctx_flavor(out / C.VIS_CTX) == ctx_h5.XC
    vis = ctx_h5.read_vis_ctx(out / C.VIS_CTX)
    assert list(vis) == [1, 2, 3, 4, 5, 6]

    # txt_ctx.hdf5: group per image, whole/five/nine with features/scores/texts; k = 16; no root attrs
    with h5py.File(out / C.TXT_CTX, "r") as f:
        assert dict(f.attrs) == {} and sorted(f.keys(), key=int) == ["1", "2", "3", "4", "5", "6"]
        g = f["4"]
        assert sorted(g.keys()) == ["five", "nine", "whole"]
        shapes = {v: {n: g[v][n].shape for n in ("features", "scores", "texts")} for v in ctx_h5.VIEWS}
        assert shapes == {
            "whole": {"features": (16, 32), "scores": (16,), "texts": (16,)},
            "five": {"features": (5, 16, 32), "scores": (5, 16), "texts": (5, 16)},
            "nine": {"features": (9, 16, 32), "scores": (9, 16), "texts": (9, 16)},
        }
        assert g["whole/texts"].id.get_type().is_variable_str() and g["whole/features"].compression is None
        assert isinstance(g["five/texts"][0, 0], bytes)
    txt = ctx_h5.read_txt_ctx(out / C.TXT_CTX)
    keys, values, captions = ctx_h5.read_caption_db(out / C.CAPTION_DB)
    assert captions == phrases and keys.shape == values.shape == (141, 32)
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1, atol=1e-5)
    for r in txt.values():
        for v in ctx_h5.VIEWS:
            scores = np.asarray(r[v].scores)
            assert (np.diff(scores, axis=-1) <= 0).all()  # descending
            ids = np.vectorize(phrases.index)(np.array(r[v].texts, dtype=object))
            assert np.array_equal(r[v].features, values[ids])  # values looked up by row id

    # caption_db.hdf5: one gzip group per 512 rows: keys, features (XC), captions
    with h5py.File(out / C.CAPTION_DB, "r") as f:
        assert sorted(f.keys()) == ["0"] and sorted(f["0"].keys()) == ["captions", "features", "keys"]
        assert all(ds.compression == "gzip" for ds in f["0"].values())

    html = (out / C.REPORT).read_text(encoding="utf-8")
    assert "RANDOM weights" in html and html.count("<img src='data:image/png;base64,") == 8
    assert "five crop 5" in html and "nine crop 9" in html


def test_same_bytes_whatever_the_shard_count(one, three):
    (a, _), (b, sb) = one, three
    assert sb["shards"] == {"images": 3, "retrieval": 3}
    assert len(list((b / "_work/context/phrases").glob("*.done.json"))) == 3
    assert same_bytes(a, b) == []
    assert (a / C.REPORT).read_bytes() == (b / C.REPORT).read_bytes()


def test_resume_skips_done_work_and_redoes_a_lost_shard(three, sample):
    out, _ = three
    before = {n: (out / n).read_bytes() for n in OUTPUTS}
    again = run(sample, out, image_shards=3, phrase_shards=3, num_workers=0)
    assert again["skipped_shards"] == {"phrases": 3, "images": 3, "retrieval": 3} and again["index_skipped"]
    assert all((out / n).read_bytes() == before[n] for n in OUTPUTS)
    (out / "_work/context/images/shard-00001-of-00003.done.json").unlink()
    again = run(sample, out, image_shards=3, phrase_shards=3, num_workers=0)
    assert again["skipped_shards"] == {"phrases": 3, "images": 2, "retrieval": 3}
    assert all((out / n).read_bytes() == before[n] for n in OUTPUTS)
    # other weights: nothing is reused (the plan items carry a fingerprint of the settings)
    other = run(sample, out, image_shards=3, phrase_shards=3, num_workers=0, weights="random:1")
    assert other["skipped_shards"] == {"phrases": 0, "images": 0, "retrieval": 0} and not other["index_skipped"]
    assert (out / C.VIS_CTX).read_bytes() != before[C.VIS_CTX]


def test_merge_refuses_a_missing_shard(one):
    out, _ = one
    work = Path(out) / "_work/context/retrieve"
    marker = work / "shard-00000-of-00001.done.json"
    saved = marker.read_bytes()
    marker.unlink()
    try:
        with pytest.raises(VlprepError, match="shard 0 of 1 has no done-marker"):
            C.merge(str(out))
    finally:
        marker.write_bytes(saved)


def test_bad_images_are_skipped_listed_and_reported(tmp_path, sample):
    src = tmp_path / "images"
    shutil.copytree(sample / "images", src)
    (src / "val2014" / "COCO_val2014_000000000007.jpg").write_bytes(b"")
    good = (src / "val2014" / "COCO_val2014_000000000004.jpg").read_bytes()
    (src / "val2014" / "COCO_val2014_000000000008.jpg").write_bytes(good[: len(good) // 3])
    out = tmp_path / "out"
    # blocks of 2 in 4 shards: the last shard holds only the two bad files
    summary = run(sample, out, images=str(src), image_shards=4, num_workers=0, topk="4,3,2")
    failed = {Path(f["item"]).name: f["error"] for f in summary["failed"]}
    assert failed.keys() == {"COCO_val2014_000000000007.jpg", "COCO_val2014_000000000008.jpg"}
    assert "zero-byte" in failed["COCO_val2014_000000000007.jpg"]
    assert "cannot decode" in failed["COCO_val2014_000000000008.jpg"]
    marker = json.loads((out / "_work/context/images/shard-00003-of-00004.done.json").read_text())
    assert marker["images"] == 0 and len(marker["failed"]) == 2
    assert list(ctx_h5.read_vis_ctx(out / C.VIS_CTX)) == [1, 2, 3, 4, 5, 6]
    assert list(ctx_h5.read_txt_ctx(out / C.TXT_CTX)) == [1, 2, 3, 4, 5, 6]
    html = (out / C.REPORT).read_text(encoding="utf-8")
    assert "Skipped images (2)" in html and "COCO_val2014_000000000007.jpg" in html and "zero-byte" in html


def test_retrieval_equals_brute_force_top_k(one):
    out, _ = one
    keys, values, captions = ctx_h5.read_caption_db(out / C.CAPTION_DB)
    shard = out / "_work/context/images/shard-00000-of-00001"
    rows = json.loads((shard / "images.json").read_text())
    queries = np.load(shard / "queries.npy")
    assert queries.shape == (6, 15, 32)
    txt = ctx_h5.read_txt_ctx(out / C.TXT_CTX)
    for e, q in zip(rows, queries, strict=True):
        sims = q @ keys.T  # (15, n): whole, five crops, nine crops
        top = np.argsort(-sims, axis=1, kind="stable")[:, :16]
        got = txt[e["key"]]
        want_ids = {"whole": top[0], "five": top[1:6], "nine": top[6:15]}
        for v, ids in want_ids.items():
            assert np.array_equal(np.vectorize(captions.__getitem__, otypes=[object])(ids), np.array(got[v].texts, dtype=object))
            np.testing.assert_allclose(got[v].scores, np.take_along_axis(sims, top, 1)[{"whole": 0, "five": slice(1, 6), "nine": slice(6, 15)}[v]], atol=1e-5)
            assert np.array_equal(got[v].features, values[ids])


def test_views_are_clip_preprocess_bit_for_bit_and_outputs_are_the_encoders(one, sample):
    import torch
    from PIL import Image

    from vlprep.models import clip, crops

    im = Image.open(sample / "images/val2014/COCO_val2014_000000000005.jpg").convert("RGB")  # a grayscale JPEG
    views = [im] + crops.five_crops(im)[1] + crops.nine_crops(im)[1]
    for rule in (clip.PREPROCESS_HF417, clip.PREPROCESS_OPENAI):
        want = torch.stack([clip.preprocess(v, rule) for v in views])
        assert torch.equal(C.normalize(C.cut_views(im, rule)), want)
    out, _ = one
    enc = C.encoder_for(C.STAGE.open(str(out)).settings(), "cpu")
    got = enc.encode_images(views)  # whole image first, then the 14 crops
    shard = out / "_work/context/images/shard-00000-of-00001"
    row = [e["key"] for e in json.loads((shard / "images.json").read_text())].index(5)
    np.testing.assert_allclose(np.load(shard / "queries.npy")[row], got["query"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ctx_h5.read_vis_ctx(out / C.VIS_CTX)[5], got["vis_ctx"][0], atol=1e-5, rtol=0)


def test_ivf_parameters_and_small_corpus_error(tmp_path):
    import faiss

    assert index.ivf_params(1) == (8, 1)  # K // 10 = 0 -> nprobe 1
    assert index.ivf_params(100) == (80, 8)
    assert index.ivf_params(3000) == (438, 43)  # round(8 * 54.77) = 438
    assert index.ivf_params(123_287 * 10) == (round(8 * np.sqrt(1_232_870)), round(8 * np.sqrt(1_232_870)) // 10)
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(3000, 16)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    built, info = index.build(keys, "ivf")
    assert info["factory"] == "IVF438,Flat" and (info["nlist"], info["nprobe"]) == (438, 43)
    index.save(built, str(tmp_path / "faiss.index"))
    back = faiss.read_index(str(tmp_path / "faiss.index"))
    assert faiss.extract_index_ivf(index.load(str(tmp_path / "faiss.index"), nprobe=7)).nprobe == 7
    ivf = faiss.extract_index_ivf(back)
    assert (ivf.nlist, ivf.nprobe, back.ntotal, back.metric_type) == (438, 43, 3000, faiss.METRIC_INNER_PRODUCT)
    # with every list probed, IVF finds the exact top-k
    ivf.nprobe = 438
    flat, _ = index.build(keys, "flat")
    q = keys[:20] + 0.1 * rng.normal(size=(20, 16)).astype(np.float32)
    assert np.array_equal(back.search(q, 5)[1], flat.search(q, 5)[1])
    with pytest.raises(VlprepError, match="use index='flat'"):
        index.build(keys[:50], "ivf")  # K = 57 > 50


def test_ivf_index_on_the_sample_is_refused_clearly(tmp_path, sample):
    # 141 phrases: IVF95 trains, but 9 probed lists hold fewer than 16 phrases
    with pytest.raises(VlprepError, match="fewer than 16 results|use index='flat'"):
        run(sample, tmp_path / "out", index="ivf", num_workers=0)


def test_haav_layouts(tmp_path, sample):
    out = tmp_path / "hv"
    summary = run(sample, out, recipe="haav", weights="random:1", text_weights="random:2", topk="8,4,2", num_workers=0)
    assert summary["weights"]["text"].startswith("ViT-L-14 RANDOM weights (seed 2)")
    with h5py.File(out / C.VIS_CTX, "r") as f:
        assert dict(f.attrs) == {"fdim_pooled": 32, "fdim_grid": 64}
        g = f["6"]
        assert (g["pooled_features"].shape, g["grid_features"].shape) == ((32,), (50, 64))
        assert g["pooled_features"].compression == g["grid_features"].compression == "gzip"
    with h5py.File(out / C.TXT_CTX, "r") as f:
        assert dict(f.attrs) == {"fdim": 32}
        assert (f["6/whole/features"].shape, f["6/five/features"].shape, f["6/nine/features"].shape) == (
            (8, 32), (5, 4, 32), (9, 2, 32))
        assert f["6/nine/texts"].compression == "gzip"
    with h5py.File(out / C.CAPTION_DB, "r") as f:
        assert sorted(f["0"].keys()) == ["captions", "keys", "values"]
    pooled = ctx_h5.read_vis_ctx(out / C.VIS_CTX)[6]["pooled"]
    np.testing.assert_allclose(np.linalg.norm(pooled), 1, atol=1e-5)


def test_image_ids_and_stem_fallback(tmp_path, sample):
    assert image_ids.context_key("gs://b/train2014/COCO_train2014_000000531912.jpg") == 531912
    assert image_ids.context_key("/x/1000092795.jpg") == 1000092795
    assert image_ids.context_key("/x/cat.png") == "cat" and image_ids.context_key("/x/img_v2.png") == "img_v2"
    assert sorted([3, "b", 12, "a"], key=image_ids.key_order) == [3, 12, "a", "b"]
    src = tmp_path / "images"
    src.mkdir()
    shutil.copy(sample / "images/train2014/COCO_train2014_000000000002.jpg", src / "chelsea.jpg")
    shutil.copy(sample / "images/train2014/COCO_train2014_000000000003.jpg", src / "COCO_x_000000000003.jpg")
    summary = run(sample, tmp_path / "out", images=str(src), num_workers=0, topk="2")
    assert summary["images"] == 2
    assert list(ctx_h5.read_vis_ctx(tmp_path / "out" / C.VIS_CTX)) == [3, "chelsea"]
    assert list(ctx_h5.read_txt_ctx(tmp_path / "out" / C.TXT_CTX)) == [3, "chelsea"]
    shutil.copy(src / "chelsea.jpg", src / "COCO_y_000000000003.jpg")
    with pytest.raises(VlprepError, match=r"same image id.*\(image id 3\)"):
        run(sample, tmp_path / "dup", images=str(src), num_workers=0)


def test_settings_errors(tmp_path, sample):
    with pytest.raises(VlprepError, match="more than the 141 phrases"):
        run(sample, tmp_path / "a", topk="200")
    with pytest.raises(VlprepError, match="one CLIP model"):
        run(sample, tmp_path / "b", text_weights="random:5")
    with pytest.raises(VlprepError, match="model_cfg"):
        run(sample, tmp_path / "c", model_cfg="huge")
    with pytest.raises(VlprepError, match="settings missing"):
        C.merge(str(tmp_path / "nothing"))


def test_cli_phrases(tmp_path, sample):
    from vlprep.cli import context as cli_context
    from vlprep.cli import parser

    p = parser()
    attrs, rels = vg_files(sample)
    args = p.parse_args(["ctx", "phrases", "--attributes", attrs, "--relationships", rels, "--out",
                         str(tmp_path / "p.txt"), "--no-attribute-leak"])
    assert args.func(args) == 0
    assert (tmp_path / "p.txt").read_text().splitlines() == vg.build_phrases(attrs, rels, attribute_leak=False)
    args = p.parse_args(["ctx", "run", "--images", "x", "--attributes", attrs, "--relationships", rels, "--out", "o",
                         "--recipe", "haav", "--topk", "8,4,2", "--index", "flat"])
    assert (args.recipe, args.topk, args.index, args.func) == ("haav", "8,4,2", "flat", cli_context.cmd_run)
    args = p.parse_args(["context", "run", "--images", "x", "--attributes", attrs, "--relationships", rels, "--out", "o",
                         "--split", "group", "--num-workers", "3"])  # the workflow's name; ctx is its alias
    assert (args.split, args.workers, args.func) == ("group", 3, cli_context.cmd_run)


# ---------------------------------------------------------------- KFP: components and the local pipeline run

PIPE_PARAMS = dict(recipe="xmodal-ctx", weights="random:0", text_weights="", model_cfg="tiny", index="flat", topk="",
                   attribute_leak=True, image_batch=2, text_batch=32, encode_batch=256, image_root="", split="balanced")


def test_plan_and_merge_components(tmp_path, sample, one):
    from kfp_harness import load, run_component

    spec, _ = load("context")
    out = tmp_path / "store"
    attrs, rels = vg_files(sample)
    vals, _ = run_component(spec, "context-plan", {
        "images": str(sample / "images"), "attributes": attrs, "relationships": rels, "out": str(out),
        "phrase_shards": 2, **PIPE_PARAMS}, tmp_path / "plan")
    phrase_specs = vals["Output"]
    assert [s["index"] for s in phrase_specs] == [0, 1] and json.loads((out / "_work/context/settings.json").read_text())[
        "model_cfg"] == C.TINY_CFG
    vals, _ = run_component(spec, "context-plan-images", {
        "phrase_shards": phrase_specs, "out": str(out), "image_shards": 2, "split": "balanced"},
        tmp_path / "plan_images")
    assert [s["index"] for s in vals["Output"]] == [0, 1]
    for s in phrase_specs:
        C.encode_phrases(s, CPU)
    C.build_index(str(out))
    for s in vals["Output"]:
        C.encode_images(s, CPU)
    for s in C.plan_retrieval(str(out)):
        C.retrieve(s, CPU)
    done = [{"shard": i, "items": 1, "skipped": False, "images": 3} for i in range(2)]
    vals, arts = run_component(spec, "context-merge", {"shards": done, "out": str(out)}, tmp_path / "merge")
    assert vals["Output"]["images"] == 6 and vals["Output"]["failed"] == []
    assert "RANDOM weights" in Path(arts["report"]).read_text(encoding="utf-8")
    assert same_bytes(out, one[0]) == []


def test_local_pipeline_run_equals_direct_stage(tmp_path, sample, one):
    from vlprep_pipelines import engine

    attrs, rels = vg_files(sample)
    params = {"images": str(sample / "images"), "attributes": attrs, "relationships": rels,
              "out": str(tmp_path / "local"), **PIPE_PARAMS, "image_shards": 2, "phrase_shards": 2,
              "num_workers": 0, "device": "cpu"}
    engine.run_local("context", params, tmp_path / "root")
    assert same_bytes(tmp_path / "local", one[0]) == []
    work = tmp_path / "local/_work/context"
    assert [len(list((work / d).glob("*.done.json"))) for d in ("phrases", "images", "retrieve")] == [2, 2, 2]
    reports = list((tmp_path / "root").rglob("report"))
    assert reports and "nine crop 9" in reports[0].read_text(encoding="utf-8")


def test_stage_on_gcs_equals_local(gcs, sample, one):
    from vlprep import storage

    out = f"{gcs}/ctx"
    summary = run(sample, out, image_shards=2)
    assert summary["images"] == 6
    for name in OUTPUTS:
        assert storage.read_bytes(storage.join(out, name)) == (one[0] / name).read_bytes(), name


def test_plan_pins_default_clip_weights_once_and_flags_the_fallback(tmp_path, sample, monkeypatch, caplog):
    """Offline, ``default`` becomes random:0 in the recorded settings, with the reason (the plan loads no model)."""
    for arch in ("VIT_B_32", "VIT_L_14"):  # a loopback port nothing listens on: unreachable
        monkeypatch.setenv(f"VLPREP_WEIGHTS_URL_CLIP_{arch}", f"http://127.0.0.1:9/{arch}.bin")
    monkeypatch.setenv("VLPREP_CACHE", str(tmp_path / "cache"))
    with caplog.at_level("WARNING"):
        C.plan(str(tmp_path / "haav"), settings(sample, recipe="haav", weights="default", model_cfg="", topk="8,4,2"))
    haav = C.STAGE.open(str(tmp_path / "haav")).settings()
    assert (haav.weights, haav.text_weights) == ("random:0", "random:0")
    assert "VIT_B_32.bin" in haav.weights_fallback and "VIT_L_14.bin" in haav.weights_fallback
    assert "Using RANDOM weights (random:0)" in caplog.text
    C.plan(str(tmp_path / "tiny"), settings(sample, weights="default"))  # a tiny model_cfg: never downloads
    tiny = C.STAGE.open(str(tmp_path / "tiny")).settings()
    assert (tiny.weights, tiny.text_weights) == ("random:0", "")
    assert tiny.weights_fallback.startswith("model_cfg replaces the ViT-B-32 architecture")
    C.plan(str(tmp_path / "asked"), settings(sample))
    assert C.STAGE.open(str(tmp_path / "asked")).settings() == settings(sample)  # explicit specs unchanged
    assert C.make_settings(images="x", attributes="a", relationships="r").weights == "default"


def test_fallback_reason_reaches_the_report(tmp_path, sample):
    summary = run(sample, tmp_path / "out", weights="default")
    assert summary["random_weights"] and summary["weights_fallback"].startswith("model_cfg replaces")
    html = (tmp_path / "out" / C.REPORT).read_text(encoding="utf-8")
    assert "The published weights were not used: model_cfg replaces the ViT-B-32 architecture" in html
