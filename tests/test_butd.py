"""BUTD detector: parity with the golden fixtures, batching invariance, safe loading, key mapping."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from vlprep import VlprepError
from vlprep.models import butd, weights
from vlprep.models.butd import BUTDConfig, BUTDDetector, decode_image, load_detector
from vlprep.models.butd_recipes import RECIPES, Recipe, RoIOutputs, get_recipe, grid_boxes

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
IMAGES = ("astronaut", "coffee", "chelsea")
PARITY_RECIPES = ("caffe10-100", "caffe36", "d2-nb36", "d2-maxnms36", "given-boxes")

# Tolerances from the fixture README ("Observed tolerance"): discrete outputs exactly equal.
FEAT_TOL = dict(atol=1e-3, rtol=1e-3)
PROB_ATOL = 1e-4
BOX_ATOL = 1e-2  # pixels


def need_shared() -> Path:
    if not (FIXTURES / "butd" / "butd_r101_c4_attr_random.pkl.gz").is_file():
        pytest.skip(f"golden BUTD fixtures not found under {SHARED} (the repo's sibling folder 'shared')")
    return FIXTURES


# ---------------------------------------------------------------- parity (full architecture)


@dataclass(frozen=True, kw_only=True)
class _Capture(Recipe):
    """Test-only recipe that records the RoI outputs it is given."""

    seen: list = field(default_factory=list)

    def select(self, out: RoIOutputs) -> dict:
        self.seen.append(out)
        return {}


@pytest.fixture(scope="module")
def parity():
    """One extract_multi call over the three fixture images with every recipe (the expensive part).

    At teardown, prints the timing and the largest differences the tests recorded (see them with -s).
    """
    fx = need_shared()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    detector = load_detector(fx / "butd" / "butd_r101_c4_attr_random.pkl.gz")
    t_load = time.perf_counter() - t0
    images = [decode_image(fx / "images" / f"{name}.jpg") for name in IMAGES]
    capture = _Capture(name="capture", prefix="")
    t0 = time.perf_counter()
    results = detector.extract_multi(images, [*PARITY_RECIPES, capture])
    t_run = time.perf_counter() - t0
    rois = {r.image_hw: r for r in capture.seen}
    state = dict(
        images=images,
        results=results,
        rois=[rois[img.shape[:2]] for img in images],
        refs={name: dict(np.load(fx / "butd" / f"{name}.npz")) for name in IMAGES},
        diffs={},
    )
    yield state
    worst: dict[str, float] = {}
    for d in state["diffs"].values():
        for k, v in d.items():
            worst[k] = max(worst.get(k, 0.0), v)
    print(
        f"\nBUTD parity: load {t_load:.1f}s, extract 3 images x {len(PARITY_RECIPES)} recipes {t_run:.1f}s; "
        f"max abs diffs over {len(state['diffs'])} checks: "
        + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
    )


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


@pytest.mark.slow
def test_decode_and_resize_match_reference():
    fx = need_shared()
    for name in IMAGES:
        ref = np.load(fx / "butd" / f"{name}.npz")
        bgr = decode_image(fx / "images" / f"{name}.jpg")
        assert np.array_equal(bgr, ref["raw_bgr"]), name
        resized = butd.resize_bgr(bgr, 600, 1000)
        assert resized.shape[:2] == tuple(ref["resized_hw"]), name
        assert np.array_equal(resized, ref["resized_bgr"]), name


@pytest.mark.slow
@pytest.mark.parametrize("index", range(3), ids=IMAGES)
def test_rpn_proposals_match_reference(parity, index):
    ref = parity["refs"][IMAGES[index]]
    rois = parity["rois"][index]
    assert rois.resized_hw == tuple(ref["resized_hw"])
    assert rois.boxes.shape == ref["rpn_proposals"].shape
    np.testing.assert_allclose(rois.boxes.numpy(), ref["rpn_proposals"], rtol=0, atol=BOX_ATOL)
    fg = rois.cls_prob[:, :-1]
    assert np.array_equal(fg.argmax(1).numpy(), ref["proposal_fg_ids"])
    assert np.array_equal(rois.cls_logits.argmax(1).numpy(), ref["proposal_argmax_all"])
    np.testing.assert_allclose(fg.max(1).values.numpy(), ref["proposal_fg_conf"], rtol=0, atol=PROB_ATOL)
    np.testing.assert_allclose(
        rois.features.numpy(), ref["proposal_features_f16"].astype(np.float32), rtol=2e-3, atol=2e-3
    )
    max_conf = RECIPES["caffe10-100"].max_conf(rois).numpy()
    np.testing.assert_allclose(max_conf, ref["proposal_max_conf"], rtol=0, atol=PROB_ATOL)
    parity["diffs"][(IMAGES[index], "rpn")] = {
        "rpn_proposals": _maxdiff(rois.boxes, ref["rpn_proposals"]),
        "proposal_fg_conf": _maxdiff(fg.max(1).values, ref["proposal_fg_conf"]),
        "proposal_max_conf": _maxdiff(max_conf, ref["proposal_max_conf"]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("recipe", PARITY_RECIPES)
@pytest.mark.parametrize("index", range(3), ids=IMAGES)
def test_recipe_matches_reference(parity, index, recipe):
    name = IMAGES[index]
    ref = parity["refs"][name]
    out = parity["results"][index][recipe]
    p = RECIPES[recipe].prefix

    n = len(ref[p + "features"])
    assert out["num_boxes"] == n
    if p + "num_boxes" in ref:
        assert out["num_boxes"] == int(ref[p + "num_boxes"])
    assert (out["image_h"], out["image_w"]) == (int(ref["image_h"]), int(ref["image_w"]))
    for key in ("obj_ids", "attr_ids"):
        assert out[key].dtype == np.int64
        assert np.array_equal(out[key], ref[p + key]), key
    if p + "proposal_idx" in ref:
        assert np.array_equal(out["proposal_idx"], ref[p + "proposal_idx"])
    for key in ("select_branch", "nms_thresh_used", "num_dropped_empty"):
        if p + key in ref:
            assert out[key] == ref[p + key].item(), key

    assert out["boxes"].dtype == np.float32 and out["features"].dtype == np.float32
    np.testing.assert_allclose(out["boxes"], ref[p + "boxes"], rtol=0, atol=BOX_ATOL)
    np.testing.assert_allclose(out["features"], ref[p + "features"], **FEAT_TOL)
    np.testing.assert_allclose(out["obj_conf"], ref[p + "obj_conf"], rtol=0, atol=PROB_ATOL)
    np.testing.assert_allclose(out["attr_conf"], ref[p + "attr_conf"], rtol=0, atol=PROB_ATOL)

    # The 13-field TSV probabilities: Caffe convention, background / no-attribute first.
    assert out["cls_prob"].shape == (n, 1601) and out["attr_prob"].shape == (n, 401)
    np.testing.assert_allclose(out["cls_prob"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(out["attr_prob"].sum(1), 1, atol=1e-5)
    if recipe != "d2-nb36":  # nb36 reports the detected class, not always the argmax
        np.testing.assert_allclose(out["cls_prob"][:, 1:].max(1), out["obj_conf"], atol=1e-7)
    logits = {"": ("cls_logits", "attr_logits"), "grid_": ("grid_cls_logits", "grid_attr_logits")}.get(p)
    if logits:
        cls_ref = torch.from_numpy(ref[logits[0]]).softmax(-1).numpy()
        attr_ref = torch.from_numpy(ref[logits[1]]).softmax(-1).numpy()
        np.testing.assert_allclose(out["cls_prob"], np.roll(cls_ref, 1, axis=1), rtol=0, atol=PROB_ATOL)
        np.testing.assert_allclose(out["attr_prob"], np.roll(attr_ref, 1, axis=1), rtol=0, atol=PROB_ATOL)
    if p == "grid_":
        assert np.array_equal(out["boxes"], ref["grid_boxes"])
        np.testing.assert_array_equal(grid_boxes(int(ref["image_h"]), int(ref["image_w"])), ref["grid_boxes"])
        assert np.array_equal(np.argmax(out["cls_prob"], 1), (ref["grid_argmax_all"] + 1) % 1601)

    parity["diffs"][(name, recipe)] = {
        k: _maxdiff(out[k], ref[p + k]) for k in ("boxes", "features", "obj_conf", "attr_conf")
    }
    if logits:
        parity["diffs"][(name, recipe)]["cls_prob"] = _maxdiff(out["cls_prob"], np.roll(cls_ref, 1, axis=1))
        parity["diffs"][(name, recipe)]["attr_prob"] = _maxdiff(
            out["attr_prob"], np.roll(attr_ref, 1, axis=1)
        )


# ---------------------------------------------------------------- batching invariance (tiny config)


def _synthetic_images() -> list[np.ndarray]:
    """8 images, 6 distinct sizes; with min/max size 128/224 several share a resized size."""
    rng = np.random.default_rng(7)
    sizes = [(120, 160), (240, 320), (90, 200), (160, 120), (64, 64), (300, 300), (100, 150), (240, 320)]
    out = []
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 3) % 256, (yy * 5) % 256, ((xx + yy) * 2) % 256], axis=-1)
        img = (base + rng.integers(0, 60, (h, w, 3))).clip(0, 255).astype(np.uint8)
        img[h // 4 : h // 2, w // 3 : w // 2] = rng.integers(0, 255, 3, dtype=np.uint8)  # a flat "object"
        out.append(img)
    return out


@pytest.fixture(scope="module")
def tiny_detector() -> BUTDDetector:
    torch.set_num_threads(2)
    return load_detector("random:0", config=BUTDConfig.tiny())


def _batched_vs_single(detector: BUTDDetector, exact: bool) -> None:
    images = _synthetic_images()
    recipes = [get_recipe(n, min_size=128, max_size=224) for n in PARITY_RECIPES]
    backbone_batches: list[int] = []
    hook = detector.backbone.register_forward_hook(lambda m, i, o: backbone_batches.append(i[0].shape[0]))
    try:
        batched = detector.extract_multi(images, recipes, batch_size=8)
        assert max(backbone_batches) >= 2, "no bucket held two images: the test lost its point"
        assert len(backbone_batches) < len(images)
        single = [detector.extract_multi([img], recipes)[0] for img in images]
    finally:
        hook.remove()
    for i, (b, s) in enumerate(zip(batched, single, strict=True)):
        for r in recipes:
            rb, rs = b[r.name], s[r.name]
            assert rb["num_boxes"] == rs["num_boxes"] > 0, (i, r.name)
            assert (rb["image_h"], rb["image_w"]) == images[i].shape[:2]
            for key in ("obj_ids", "attr_ids", "proposal_idx"):
                assert np.array_equal(rb[key], rs[key]), (i, r.name, key)
            if exact:
                for key in ("boxes", "features", "cls_prob", "attr_prob"):
                    assert np.array_equal(rb[key], rs[key]), (i, r.name, key)
            else:
                assert _maxdiff(rb["boxes"], rs["boxes"]) <= 1e-3, (i, r.name)
                assert _maxdiff(rb["features"], rs["features"]) <= 1e-4, (i, r.name)
                assert _maxdiff(rb["cls_prob"], rs["cls_prob"]) <= 1e-5, (i, r.name)


def test_batched_equals_one_by_one(tiny_detector):
    """8 mixed-size images in one call vs one by one: the same regions, features within 1e-4.

    With oneDNN (the default CPU conv backend) a batch of N may use other conv kernels than a batch
    of 1, so res4 differs in the last float bits and box coordinates by float32 rounding (~1e-5 px).
    """
    _batched_vs_single(tiny_detector, exact=False)


def _conv_batch_dependence(detector: BUTDDetector) -> str | None:
    """The first conv of the detector whose output for one image changes with the batch, on this CPU.

    Runs the backbone and the RPN head on 3 images of one size, then every conv on the inputs it saw,
    batched and one image at a time. Whether a conv kernel is batch-invariant is a property of the
    hardware, the BLAS and the thread count (e.g. MKL on an AVX-512/AMX Xeon with 2 threads splits
    a batch-of-1 GEMM across threads, another batch not), not of the detector's code.
    """
    seen: list[tuple[str, torch.nn.Conv2d, torch.Tensor]] = []
    names = {m: n for n, m in detector.named_modules()}
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append((names[m], m, i[0])))
        for m in detector.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    x = torch.from_numpy(np.random.default_rng(0).normal(0, 50, (3, 3, 128, 176)).astype(np.float32))
    try:
        with torch.inference_mode():
            detector.rpn.head(detector.backbone(x))
    finally:
        for h in hooks:
            h.remove()
    with torch.inference_mode():
        for name, conv, inp in seen:
            alone = torch.cat([conv(inp[k : k + 1]) for k in range(len(inp))])
            if not torch.equal(conv(inp), alone):
                return name
    return None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_batched_is_bitwise_identical_on_native_convs(tiny_detector):
    """Without oneDNN, batching changes nothing at all: no padding or cross-image leakage.

    Only where this CPU's native conv kernels are themselves batch-invariant (probed first); the
    guarantee on every CPU is test_batched_equals_one_by_one's 1e-4.
    """
    with torch.backends.mkldnn.flags(enabled=False):
        layer = _conv_batch_dependence(tiny_detector)
        if layer is not None:
            pytest.skip(
                f"on this CPU with {torch.get_num_threads()} threads the native conv kernel of {layer} "
                "gives an image other bits in a batch than alone; a bitwise check cannot hold here"
            )
        _batched_vs_single(tiny_detector, exact=True)


def test_extract_single_recipe_and_given_boxes(tiny_detector):
    images = _synthetic_images()[:3]
    boxes = [
        np.array([[0, 0, 10, 10], [5, 5, images[k].shape[1], images[k].shape[0]]], np.float32)
        for k in range(3)
    ]
    res = tiny_detector.extract(images, get_recipe("given-boxes", min_size=128, max_size=224), boxes=boxes)
    assert [r["num_boxes"] for r in res] == [2, 2, 2]
    for r, b in zip(res, boxes, strict=True):
        assert np.array_equal(r["boxes"], b)
        assert r["features"].shape == (2, tiny_detector.cfg.feature_dim)
    res = tiny_detector.extract(images, get_recipe("caffe36", min_size=128, max_size=224))
    assert all(r["num_boxes"] == 36 for r in res)
    for r in res:  # boxes are unregressed proposals in original pixels
        assert (r["boxes"][:, 2] <= r["image_w"] + 1e-3).all() and (
            r["boxes"][:, 3] <= r["image_h"] + 1e-3
        ).all()


def test_bad_inputs_are_clear_errors(tiny_detector):
    with pytest.raises(VlprepError, match="uint8 HxWx3"):
        tiny_detector.extract([np.zeros((10, 10), np.uint8)], "caffe36")
    with pytest.raises(VlprepError, match="unknown BUTD recipe"):
        get_recipe("caffe-37")
    with pytest.raises(VlprepError, match="CUDA-only"):
        tiny_detector.configure(autocast_dtype="bf16")
    with pytest.raises(VlprepError, match="distinct"):
        tiny_detector.extract_multi([np.zeros((8, 8, 3), np.uint8)], ["caffe36", "caffe36"])


def test_recipe_defaults_follow_upstreams():
    assert RECIPES["caffe10-100"].min_boxes == 10 and RECIPES["caffe10-100"].max_boxes == 100
    assert RECIPES["caffe36"].min_boxes == RECIPES["caffe36"].max_boxes == 36
    assert (RECIPES["d2-maxnms36"].nms_start, RECIPES["d2-maxnms36"].min_size) == (0.3, 600)
    volta = RECIPES["d2-maxnms36-volta"]
    assert (volta.nms_start, volta.min_size, volta.max_size) == (0.5, 800, 1333)
    assert get_recipe("d2-maxnms36", nms_start=0.5).nms_start == 0.5
    assert butd.resized_hw(512, 512, 600, 1000) == (600, 600)
    assert butd.resized_hw(300, 451, 600, 1000) == (600, 902)
    assert butd.resized_hw(100, 1000, 600, 1000) == (100, 1000)
    g = grid_boxes(400, 600)
    assert g.shape == (64, 4) and g[9].tolist() == [75.0, 50.0, 150.0, 100.0]  # row 1, column 1


# ---------------------------------------------------------------- checkpoints and key mapping


def _d2_pickle(path: Path, model: BUTDDetector, *, fp16: bool = True, layout: str = "d2") -> dict:
    arrays = {
        k: v.numpy().astype(np.float16 if fp16 else np.float32)
        for k, v in butd.to_d2_state_dict(model).items()
    }
    data = (
        {"model": arrays, "__author__": "test"}
        if layout == "d2"
        else {"blobs": arrays}
        if layout == "blobs"
        else arrays
    )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return arrays


def test_key_mapping_round_trip(tmp_path):
    cfg = BUTDConfig.tiny()
    src = load_detector("random:5", config=cfg)
    d2 = butd.to_d2_state_dict(src)
    assert "proposal_generator.rpn_head.conv.weight" in d2 and "rpn.head.conv.weight" not in d2
    assert "roi_heads.box_predictor.attr_score.weight" in d2
    assert all(butd.vlprep_to_d2_key(butd.d2_to_vlprep_key(k)) == k for k in d2)
    assert butd.d2_to_vlprep_key("proposal_generator.anchor_generator.cell_anchors.0") is None

    path = tmp_path / "tiny.pkl"
    _d2_pickle(path, src, fp16=False)
    loaded = load_detector(path, config=cfg)
    assert not loaded.is_random
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k

    other = load_detector("random:6", config=cfg)
    butd.load_state(other, {**d2, "proposal_generator.anchor_generator.cell_anchors.0": torch.zeros(12, 4)})
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in src.state_dict().items())


@pytest.mark.parametrize("layout", ["d2", "blobs", "plain"])
def test_pickle_layouts_and_fp16(tmp_path, layout):
    cfg = BUTDConfig.tiny()
    src = load_detector("random:1", config=cfg)
    path = tmp_path / f"w_{layout}.pkl.gz"
    arrays = _d2_pickle(path, src, fp16=True, layout=layout)
    data, found = weights.load_checkpoint(path)
    assert found == layout
    model = load_detector(path, config=cfg)
    w = model.state_dict()["backbone.res2.0.conv1.weight"]
    assert w.dtype == torch.float32
    assert torch.equal(w, torch.from_numpy(arrays["backbone.res2.0.conv1.weight"].astype(np.float32)))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_torch_state_dict_is_loaded_weights_only(tmp_path, zipfile):
    cfg = BUTDConfig.tiny()
    src = load_detector("random:2", config=cfg)
    path = tmp_path / "w.pth"
    torch.save({"model": butd.to_d2_state_dict(src)}, path, _use_new_zipfile_serialization=zipfile)
    model = load_detector(path, config=cfg)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in src.state_dict().items())

    evil = tmp_path / "evil.pth"
    target = tmp_path / "created-by-torch-file"
    torch.save({"x": _Boom(str(target))}, evil, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(VlprepError, match=re.escape(str(evil)) + ".*weights_only"):
        load_detector(evil, config=cfg)
    assert not target.exists()


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    cfg = BUTDConfig.tiny()
    d2 = butd.to_d2_state_dict(load_detector("random:0", config=cfg))
    model = BUTDDetector(cfg)
    broken = dict(d2)
    del broken["roi_heads.box_predictor.fc_attr.weight"]
    broken["roi_heads.box_predictor.extra.weight"] = torch.zeros(3)
    with pytest.raises(VlprepError) as e:
        butd.load_state(model, broken, source="ck.pkl")
    msg = str(e.value)
    assert "ck.pkl" in msg and "roi_heads.box_predictor.fc_attr.weight" in msg
    assert "roi_heads.box_predictor.extra.weight" in msg
    with pytest.raises(VlprepError, match="wrong shapes"):
        butd.load_state(BUTDDetector(BUTDConfig.tiny(num_classes=30)), d2, source="ck.pkl")
    # Converted Caffe models carry no FrozenBN statistics: detectron2 uses mean 0 / var 1.
    no_stats = {k: v for k, v in d2.items() if not k.endswith(("running_mean", "running_var"))}
    butd.load_state(model, no_stats)
    assert torch.equal(model.backbone.stem.conv1.norm.running_var, torch.ones(cfg.stem_channels))


class _Boom:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("suffix", [".pkl", ".pkl.gz"])
def test_restricted_unpickler_refuses_code(tmp_path, suffix):
    target = tmp_path / "created-by-pickle"
    path = tmp_path / f"evil{suffix}"
    opener = gzip.open if suffix.endswith(".gz") else open
    with opener(path, "wb") as f:
        pickle.dump({"model": {"x": np.zeros(2)}, "__author__": _Boom(str(target))}, f)
    with pytest.raises(VlprepError) as e:
        weights.load_checkpoint(path)
    assert str(path) in str(e.value) and "mkdir" in str(e.value)
    assert not target.exists()

    path2 = tmp_path / f"system{suffix}"
    with opener(path2, "wb") as f:
        pickle.dump({"blobs": {"x": _System()}}, f)
    with pytest.raises(VlprepError, match=re.escape(str(path2)) + r".*(posix|os)\.system"):
        load_detector(path2, config=BUTDConfig.tiny())


def test_full_architecture_names_match_detectron2_list():
    """Every detectron2 name and shape in the fixture README maps onto the full model, and back."""
    readme = need_shared() / "butd" / "README.md"
    listed = dict(
        (m.group(1), tuple(int(x) for x in m.group(2).split(",")))
        for m in re.finditer(
            r"^((?:backbone|proposal_generator|roi_heads)\.\S+)\t\[([\d, ]+)\]$", readme.read_text(), re.M
        )
    )
    assert len(listed) == 535
    model = BUTDDetector(BUTDConfig())
    ours = {k: tuple(v.shape) for k, v in butd.to_d2_state_dict(model).items()}
    assert ours == listed
