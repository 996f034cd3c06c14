"""Cross-modal context (Xmodal-Ctx / HAAV): CLIP encoders, crops, VG phrases and HDF5 layouts."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import logging

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from vlprep import VlprepError
from vlprep.data import visual_genome as vg
from vlprep.formats import ctx_h5
from vlprep.models import clip as C
from vlprep.models import crops

# A tiny model in the real (OpenAI ViT) architecture: 224 px input, 32 px patches (50 tokens), the real
# vocabulary and context length; QuickGELU comes from the loader.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PHRASES = [
    "white dog",
    "man riding  horse",  # empty predicate: double space
    "red hot_dog",
    "café on corner",
    "it's 3 o'clock",
    "wooden table-top",
    "large 日本 sign",
]
LONG = "tall " * 90 + "tree"  # > 75 tokens: XC cuts off the EOS


def image(w: int, h: int, seed: int = 0) -> Image.Image:
    """A deterministic test picture: gradients plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8))


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random values in every tensor (LayerNorms included), so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def hf_clip_tokenizer():
    """transformers' CLIPTokenizer built offline from the BPE file open_clip ships (= the hub's vocab)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


# ---------------------------------------------------------------- crops


SIZES = [(640, 480), (640, 427), (333, 500), (101, 77), (375, 500), (97, 1003)]


@pytest.mark.parametrize("w,h", SIZES)
def test_five_crops_match_torchvision_with_float_size(w, h):
    from torchvision.transforms import functional as F

    im = image(w, h)
    boxes, ours = crops.five_crops(im)
    theirs = F.five_crop(im, (h * 0.6, w * 0.6))  # upstream passes floats
    assert len(ours) == 5
    for box, a, b in zip(boxes, ours, theirs, strict=True):
        assert a.size == b.size == (box[2] - box[0], box[3] - box[1])
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert np.array_equal(np.asarray(a), np.asarray(im)[box[1] : box[3], box[0] : box[2]])


def test_five_crop_boxes_by_hand():
    # 640x427: crop 384.0 x 256.2; bottom rows start at 427 - 256.2 = 170.8 -> PIL rounds to 171;
    # centre top int(round(170.8 / 2)) = 85, bottom round(85 + 256.2) = 341.
    assert crops.five_crop_boxes(640, 427) == [
        (0, 0, 384, 256),
        (256, 0, 640, 256),
        (0, 171, 384, 427),
        (256, 171, 640, 427),
        (128, 85, 512, 341),
    ]


@pytest.mark.parametrize("w,h", SIZES)
def test_nine_crops_grid(w, h):
    from torchvision.transforms import functional as F

    im = image(w, h)
    boxes, ours = crops.nine_crops(im)
    rows = [(0, int(0.4 * h)), (int(0.3 * h), int(0.7 * h)), (int(0.6 * h), h)]
    cols = [(0, int(0.4 * w)), (int(0.3 * w), int(0.7 * w)), (int(0.6 * w), w)]
    assert boxes == [(x0, y0, x1, y1) for (y0, y1), (x0, x1) in itertools.product(rows, cols)]  # row-major
    for (x0, y0, x1, y1), crop in zip(boxes, ours, strict=True):
        assert np.array_equal(np.asarray(crop), np.asarray(F.crop(im, y0, x0, y1 - y0, x1 - x0)))


def test_nine_crop_boxes_by_hand():
    assert crops.nine_crop_boxes(640, 480) == [
        (0, 0, 256, 192), (192, 0, 448, 192), (384, 0, 640, 192),
        (0, 144, 256, 336), (192, 144, 448, 336), (384, 144, 640, 336),
        (0, 288, 256, 480), (192, 288, 448, 480), (384, 288, 640, 480),
    ]  # fmt: skip


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("w,h", [(640, 480), (640, 427), (229, 300), (640, 458), (224, 224), (300, 1000)])
def test_openai_preprocessing_equals_open_clip_transform(w, h):
    import open_clip

    tf = open_clip.image_transform(224, is_train=False)
    im = image(w, h, seed=w)
    assert torch.equal(C.preprocess(im, C.PREPROCESS_OPENAI), tf(im))


def test_hf417_centre_crop_rounds_half_up():
    # 229x300 -> 224x293: margin 69. HF 4.17 CLIPFeatureExtractor: int((69 + 1) * 0.5) = 35;
    # torchvision / clip: round(34.5) = 34 (half to even).
    im = image(229, 300)
    resized = C.resize_short_side(im)
    assert resized.size == (224, 293)
    assert C.center_crop_box(224, 293, 224, C.PREPROCESS_HF417) == (0, 35, 224, 259)
    assert C.center_crop_box(224, 293, 224, C.PREPROCESS_OPENAI) == (0, 34, 224, 258)
    x = torch.from_numpy(np.asarray(resized.crop((0, 35, 224, 259)), dtype=np.float32)).permute(2, 0, 1) / 255
    want = (x - torch.tensor(C.CLIP_MEAN)[:, None, None]) / torch.tensor(C.CLIP_STD)[:, None, None]
    assert torch.equal(C.preprocess(im, C.PREPROCESS_HF417), want)
    # 640x427 (a common COCO size) -> 335x224, margin 111: both rules give 56.
    assert C.center_crop_box(335, 224, 224, C.PREPROCESS_HF417) == C.center_crop_box(335, 224, 224, C.PREPROCESS_OPENAI)


# ---------------------------------------------------------------- tokens


def test_xc_tokens_match_hf_clip_tokenizer_cut_at_75():
    tok = hf_clip_tokenizer()
    ids = C.tokenize(PHRASES + [LONG], "hf-75")
    assert ids.shape == (len(PHRASES) + 1, 75)
    for row, text in zip(ids.tolist(), PHRASES + [LONG], strict=True):
        want = tok(text)["input_ids"][:75]
        assert row == want + [0] * (75 - len(want))
    assert 49407 not in ids[-1].tolist()  # the long phrase lost its EOS, as in XC's collate_tokens


def test_haav_tokens_match_open_clip_tokenize():
    import open_clip

    ids = C.tokenize(PHRASES, "openai-77")
    full = open_clip.tokenize(PHRASES)  # clip.tokenize's layout: (N, 77) zero padded
    assert torch.equal(full[:, : ids.shape[1]], ids) and not full[:, ids.shape[1] :].any()
    long = C.tokenize([LONG], "openai-77")
    assert long.shape == (1, 77) and long[0, -1] == 49407


# ---------------------------------------------------------------- models


def hf_config(eos_token_id: int):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=eos_token_id,
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=224,
            patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        ),
        projection_dim=32,
    )  # fmt: skip


def compare_with_hf(enc: C.ClipContextEncoder, hf, images, texts) -> dict[str, float]:
    """Max abs differences between our XC outputs and transformers' CLIPModel used as XC used it."""
    out = enc.encode_images(images)
    keys, values = enc.encode_texts(texts)
    pixels = enc.preprocess(images)
    ids = C.tokenize(texts, "hf-75")
    mask = torch.zeros_like(ids)  # XC's attention mask: 1 on each text's tokens, 0 on the padding
    for i, text in enumerate(texts):
        mask[i, : C.tokenize([text], "hf-75").shape[1]] = 1
    with torch.no_grad():
        vis = hf.vision_model(pixel_values=pixels).pooler_output
        query = hf.visual_projection(vis)
        txt = hf.text_model(input_ids=ids, attention_mask=mask).pooler_output
        key = hf.text_projection(txt)
    return {
        "vision pooler_output vs vis_ctx": float(np.abs(out["vis_ctx"] - vis.numpy()).max()),
        "normalized visual_projection vs query": float(np.abs(out["query"] - (query / query.norm(dim=-1, keepdim=True)).numpy()).max()),
        "text pooler_output vs values": float(np.abs(values - txt.numpy()).max()),
        "normalized text_projection vs keys": float(np.abs(keys - (key / key.norm(dim=-1, keepdim=True)).numpy()).max()),
    }  # fmt: skip


def test_xmodal_ctx_equals_transformers_clipmodel_on_same_weights(capsys):
    """Upstream XC ran HF CLIPModel (4.17, argmax EOS pooling): same random weights, same outputs."""
    from transformers import CLIPModel

    enc = C.ClipContextEncoder("xmodal-ctx", weights="random:0", model_cfg=TINY)
    _perturb(enc.model("image"), seed=1)
    # eos_token_id=2 selects transformers' legacy argmax pooling, which is what 4.17 did.
    hf = CLIPModel(hf_config(eos_token_id=2)).eval()
    hf.load_state_dict(C.open_clip_to_hf_state_dict(enc.model("image").state_dict()), strict=True)
    images = [image(640, 480, 1), image(333, 500, 2), image(229, 300, 3)]
    diffs = compare_with_hf(enc, hf, images, PHRASES + [LONG])
    with capsys.disabled():
        print("\nopen_clip vs transformers CLIPModel, max abs diff:", json.dumps(diffs))
    assert max(diffs.values()) < 1e-5


def test_state_dict_conversion_round_trip_and_hf_checkpoint_loading(tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPModel

    enc = C.ClipContextEncoder("xmodal-ctx", weights="random:3", model_cfg=TINY)
    _perturb(enc.model("image"), seed=4)
    sd = enc.model("image").state_dict()
    back = C.hf_to_open_clip_state_dict(C.open_clip_to_hf_state_dict(sd))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    hf = CLIPModel(hf_config(eos_token_id=49407))
    hf.load_state_dict(C.open_clip_to_hf_state_dict(sd))
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    torch.save(sd, tmp_path / "open_clip.pt")
    images, want = [image(300, 200)], enc.encode_images([image(300, 200)])
    for path in (tmp_path / "model.safetensors", tmp_path / "open_clip.pt"):
        other = C.ClipContextEncoder("xmodal-ctx", weights=str(path), model_cfg=TINY)
        assert not other.is_random
        got = other.encode_images(images)
        assert all(np.array_equal(got[k], want[k]) for k in want)
        assert all(np.array_equal(a, b) for a, b in zip(other.encode_texts(PHRASES), enc.encode_texts(PHRASES), strict=True))


def test_haav_outputs_are_upstreams_definitions():
    """HV: pooled/grid from the image model, keys/values/query from the text model, on full 77 tokens."""
    import open_clip

    enc = C.ClipContextEncoder("haav", weights={"image": "random:1", "text": "random:2"}, model_cfg=TINY)
    img_model, txt_model = enc.model("image"), enc.model("text")
    _perturb(img_model, 5)
    _perturb(txt_model, 6)
    images = [image(640, 427, 7), image(200, 300, 8)]
    out = enc.encode_images(images)
    pixels = enc.preprocess(images)
    captured = {}
    hook = img_model.visual.transformer.register_forward_hook(lambda m, i, o: captured.__setitem__("grid", o))
    with torch.no_grad():
        pooled = img_model.encode_image(pixels, normalize=True)
        query = txt_model.encode_image(pixels, normalize=True)
    hook.remove()
    assert out["grid"].shape == (2, 50, 64) and out["pooled"].shape == (2, 32) and out["query"].shape == (2, 32)
    np.testing.assert_allclose(out["grid"], captured["grid"].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["pooled"], pooled.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["query"], query.numpy(), atol=1e-5, rtol=0)

    keys, values = enc.encode_texts(PHRASES)
    ids = open_clip.tokenize(PHRASES)  # 77 positions, as clip.tokenize
    hook = txt_model.transformer.register_forward_hook(lambda m, i, o: captured.__setitem__("text", o))
    with torch.no_grad():
        want_keys = txt_model.encode_text(ids, normalize=True)
    hook.remove()
    want_values = captured["text"][torch.arange(len(ids)), ids.argmax(-1)]  # x[EOT] before ln_final
    np.testing.assert_allclose(keys, want_keys.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(values, want_values.numpy(), atol=1e-5, rtol=0)
    assert enc.dims == {"query": (32,), "key": (32,), "value": (32,), "pooled": (32,), "grid": (50, 64)}


def test_random_weights_are_deterministic_flagged_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a = C.ClipContextEncoder("xmodal-ctx", weights="random:0", model_cfg=TINY)
    assert torch.equal(state, torch.random.get_rng_state())
    b = C.ClipContextEncoder("xmodal-ctx", weights="random:0", model_cfg=TINY)
    c = C.ClipContextEncoder("xmodal-ctx", weights="random:1", model_cfg=TINY)
    ims = [image(256, 256)]
    assert np.array_equal(a.encode_images(ims)["vis_ctx"], b.encode_images(ims)["vis_ctx"])
    assert not np.array_equal(a.encode_images(ims)["vis_ctx"], c.encode_images(ims)["vis_ctx"])
    assert a.is_random and "RANDOM" in a.loaded["image"].description
    assert a.encode_images(ims, outputs=["query"]).keys() == {"query"}
    keys, values = a.encode_texts([])
    assert keys.shape == (0, 32) and values.shape == (0, 32)


def test_recipes_and_bad_specs(tmp_path):
    assert C.get_recipe("xmodal-ctx").topk == (16, 16, 16) and C.get_recipe("haav").topk == (128, 32, 16)
    assert C.XMODAL_CTX.dims["vis_ctx"] == (768,) and C.HAAV.dims["grid"] == (50, 768)
    assert C.XMODAL_CTX.caption_values_name == "features" and C.HAAV.caption_values_name == "values"
    with pytest.raises(VlprepError, match="unknown context recipe"):
        C.get_recipe("nope")
    with pytest.raises(VlprepError, match="one weights spec"):
        C.ClipContextEncoder("xmodal-ctx", weights={"image": "random:0", "text": "random:1"}, model_cfg=TINY)
    with pytest.raises(VlprepError, match="file not found"):
        C.ClipContextEncoder("xmodal-ctx", weights=str(tmp_path / "missing.pt"), model_cfg=TINY)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(VlprepError, match="not a ViT-B-32 CLIP checkpoint"):
        C.ClipContextEncoder("xmodal-ctx", weights=str(tmp_path / "other.pt"), model_cfg=TINY)


@pytest.mark.slow
def test_full_size_models_shapes_and_hf_parity():
    """Full ViT-B-32 (XC, vs transformers' default CLIPConfig = clip-vit-base-patch32) and ViT-L-14 (HV)."""
    from transformers import CLIPConfig, CLIPModel

    logging.getLogger("root").setLevel(logging.ERROR)
    xc = C.ClipContextEncoder("xmodal-ctx", weights="random:0")
    assert xc.dims == {k: v for k, v in C.XMODAL_CTX.dims.items()}
    hf = CLIPModel(CLIPConfig()).eval()
    hf.load_state_dict(C.open_clip_to_hf_state_dict(xc.model("image").state_dict()), strict=True)
    diffs = compare_with_hf(xc, hf, [image(640, 480)], PHRASES)
    assert max(diffs.values()) < 1e-4, diffs
    hv = C.ClipContextEncoder("haav", weights="random:0")
    assert hv.dims == {k: v for k, v in C.HAAV.dims.items()}
    out = hv.encode_images([image(640, 480)])
    assert {k: v.shape[1:] for k, v in out.items()} == {k: C.HAAV.dims[k] for k in ("pooled", "grid", "query")}
    keys, values = hv.encode_texts(PHRASES[:2])
    assert keys.shape == (2, 768) and values.shape == (2, 768)


# ---------------------------------------------------------------- Visual Genome phrases


ATTRIBUTES = [
    {
        "image_id": 1,
        "attributes": [
            # one annotation with two synsets: with the leak, "shirt" and "jacket" share one set
            {"synsets": ["shirt.n.01", "jacket.n.01"], "names": ["shirt"], "attributes": ["Red ", "\tstriped"]},
            {"synsets": ["shirt.n.01"], "attributes": ["big"]},  # leaks into jacket
            {"synsets": ["Hot_Dog.n.01"], "attributes": ["GRILLED", "", "  "]},  # empty attributes dropped
            {"synsets": ["dog.n.01"]},  # no attributes key: no phrase, but "dog" is now known
            {"names": ["tree"], "attributes": ["green"]},  # no synsets: nothing
        ],
    },
    {
        "image_id": 2,
        "attributes": [
            {"synsets": ["jacket.n.01", "coat.n.01"], "attributes": ["warm"]},  # jacket known (shared set), coat new
            {"synsets": ["dog.n.01"], "attributes": ["brown"]},
        ],
    },
]
RELATIONSHIPS = [
    {
        "image_id": 1,
        "relationships": [
            {"predicate": "ON", "subject": {"synsets": ["dog.n.01"]}, "object": {"synsets": ["table.n.02", "desk.n.01"]}},
            {"predicate": "", "subject": {"synsets": ["man.n.01"]}, "object": {"synsets": ["horse.n.01"]}},
            {"predicate": "has", "subject": {"synsets": []}, "object": {"synsets": ["hat.n.01"]}},
        ],
    },
    {"image_id": 2, "relationships": [{"predicate": "on", "subject": {"synsets": ["dog.n.01"]}, "object": {"synsets": ["table.n.02"]}}]},
]  # fmt: skip
EXPECTED_LEAK = [
    "big jacket",  # leaked from the shirt annotation
    "big shirt",
    "brown dog",
    "dog on desk",
    "dog on table",
    "grilled hot_dog",
    "man  horse",
    "red jacket",
    "red shirt",
    "striped jacket",
    "striped shirt",
    "warm coat",
    "warm jacket",
    "warm shirt",  # leaked: jacket's set is shirt's set
]
EXPECTED_NO_LEAK = [p for p in EXPECTED_LEAK if p not in ("big jacket", "warm shirt")]


def _json(obj) -> io.BytesIO:
    return io.BytesIO(json.dumps(obj, ensure_ascii=False).encode("utf-8"))


def upstream_reference(attributes: list, relationships: list) -> list[str]:
    """Upstream's algorithm stated literally (set objects shared, np.unique), for comparison."""
    ctl = str.maketrans("", "", "".join(map(chr, range(32))))
    word = lambda s: s.lower().strip().translate(ctl)  # noqa: E731
    objs: dict[str, set] = {}
    for x in attributes:
        for a in x["attributes"]:
            attrs = {word(y) for y in a.get("attributes", [])}
            for n in {word(y).split(".")[0] for y in a.get("synsets", [])}:
                if n in objs:
                    objs[n] |= attrs
                else:
                    objs[n] = attrs
    rels = set()
    for x in relationships:
        for r in x["relationships"]:
            for s in {word(y).split(".")[0] for y in r["subject"]["synsets"]}:
                for o in {word(y).split(".")[0] for y in r["object"]["synsets"]}:
                    rels.add(f"{s} {word(r['predicate'])} {o}")
    caps = [f"{a} {o}" for o in objs for a in objs[o] if a != ""] + sorted(rels)
    return np.unique(caps).tolist()


def test_vg_phrases_by_hand_with_and_without_leak():
    assert vg.build_phrases(_json(ATTRIBUTES), _json(RELATIONSHIPS)) == EXPECTED_LEAK
    assert vg.build_phrases(_json(ATTRIBUTES), _json(RELATIONSHIPS), attribute_leak=False) == EXPECTED_NO_LEAK
    assert upstream_reference(ATTRIBUTES, RELATIONSHIPS) == EXPECTED_LEAK


def test_vg_phrases_equal_upstream_on_random_data(tmp_path):
    rng = np.random.default_rng(0)
    heads = ["man.n.01", "Dog.n.01", "hot_dog.n.01", "café.n.01", "tree", "sky.n.01", "x.y.z", ".n.01"]
    words = ["red", "Big ", "\x07old", "", "ça", "日本", "on", "next to", "Ünder"]

    def pick(pool, most):
        return [str(v) for v in rng.choice(pool, size=rng.integers(0, most + 1))]

    attributes = [
        {"attributes": [{"synsets": pick(heads, 3), "attributes": pick(words, 3)} for _ in range(rng.integers(0, 6))]}
        for _ in range(200)
    ]
    relationships = [
        {"relationships": [
            {"predicate": str(rng.choice(words)), "subject": {"synsets": pick(heads, 2)}, "object": {"synsets": pick(heads, 2)}}
            for _ in range(rng.integers(0, 6))
        ]}
        for _ in range(200)
    ]  # fmt: skip
    (tmp_path / "attributes.json").write_text(json.dumps(attributes), encoding="utf-8")
    (tmp_path / "relationships.json").write_text(json.dumps(relationships), encoding="utf-8")
    got = vg.build_phrases(str(tmp_path / "attributes.json"), str(tmp_path / "relationships.json"))
    assert got == upstream_reference(attributes, relationships)
    assert len(got) > 50


def test_np_unique_order_equals_python_sort_on_unicode():
    strings = ["b", "a", "ab", "a b", "Z", "é", "e\u0301", "日本", "😀 x", "\u2028", "a\U0001f600", "ä", "a", "", "~"]
    assert np.unique(strings).tolist() == sorted(set(strings))


def test_vg_normalizers():
    assert vg.normalize_synset("  Hot_Dog.N.01 ") == "hot_dog"
    assert vg.normalize_synset("\x01Man") == "man"
    assert vg.normalize_word("\tRed\n") == "red"
    assert vg.normalize_word(" a\x1fb ") == "ab"


@pytest.mark.parametrize(
    "doc,where",
    [
        (b'[{"attributes": [{"synsets": ["a.n.01"]}]}, {"attributes": [', "invalid JSON after image entry 0"),
        (b'[{"attributes": [{"synsets": ["a.n.01"]}, {"synsets": null}]}]', "entry 0.attributes[1].synsets"),
        (b'[{"image_id": 3}]', "entry 0: expected an object with key 'attributes'"),
        (b'{"attributes": []}', "expected a JSON list"),
        (b"", "expected a JSON list"),
    ],
)
def test_vg_malformed_input_names_file_and_place(tmp_path, doc, where):
    path = tmp_path / "attributes.json"
    path.write_bytes(doc)
    (tmp_path / "relationships.json").write_bytes(b"[]")
    with pytest.raises(VlprepError) as e:
        vg.build_phrases(str(path), str(tmp_path / "relationships.json"))
    assert str(path) in str(e.value) and where in str(e.value)


def test_vg_malformed_relationship():
    rel = [{"relationships": [{"predicate": "on", "subject": {"synsets": ["a.n.01"]}, "object": {}}]}]
    with pytest.raises(VlprepError, match=r"entry 0\.relationships\[0\]\.object"):
        vg.build_phrases(_json([]), _json(rel))


def test_write_and_read_phrases():
    phrases = ["man  horse", "café ça", "line\u2028sep", "日本 sign"]
    buf = io.BytesIO()
    assert vg.write_phrases(phrases, buf) == 4
    assert buf.getvalue() == "\n".join(phrases).encode("utf-8") + b"\n"
    buf.seek(0)
    assert vg.read_phrases(buf) == phrases
    with pytest.raises(VlprepError, match="phrase 0"):
        vg.write_phrases(["bad \ud800"], io.BytesIO())


# ---------------------------------------------------------------- HDF5 layouts


def _upstream_style_xc_vis(path, ids, feats):
    """What XC's encode_images.py does, to compare storage properties with."""
    with h5py.File(path, "a") as f:
        f.attrs["fdim"] = feats.shape[-1]
        for i in range(len(ids)):
            f.create_dataset(str(int(ids[i])), data=feats[i])


def _props(d: h5py.Dataset) -> tuple:
    t = d.id.get_type()
    return (d.shape, d.dtype.str if d.dtype.kind != "O" else "O", d.compression, d.compression_opts, d.chunks,
            t.is_variable_str() if isinstance(t, h5py.h5t.TypeStringID) else None,
            t.get_cset() if isinstance(t, h5py.h5t.TypeStringID) else None)  # fmt: skip


def test_xc_vis_ctx_layout(tmp_path):
    rng = np.random.default_rng(0)
    ids, feats = [531912, 9], rng.normal(size=(2, 768)).astype(np.float32)
    with ctx_h5.XcVisCtxWriter(tmp_path / "vis_ctx.hdf5") as w:
        for i, x in zip(ids, feats, strict=True):
            w.add(i, x)
    _upstream_style_xc_vis(tmp_path / "up.hdf5", ids, feats)
    with h5py.File(tmp_path / "vis_ctx.hdf5", "r") as f, h5py.File(tmp_path / "up.hdf5", "r") as up:
        assert dict(f.attrs) == {"fdim": 768} and f.attrs["fdim"].dtype == up.attrs["fdim"].dtype == np.int64
        assert sorted(f.keys()) == ["531912", "9"]
        for name in f:
            assert isinstance(f[name], h5py.Dataset)
            assert _props(f[name]) == _props(up[name]) == ((768,), "<f4", None, None, None, None, None)
    back = ctx_h5.read_vis_ctx(tmp_path / "vis_ctx.hdf5")
    assert back.keys() == {531912, 9} and np.array_equal(back[531912], feats[0])
    assert not list(tmp_path.glob(".tmp-*"))


def _retrieved(rng, k, d, n=None):
    lead = (k,) if n is None else (n, k)
    texts = [f"phrase {i} é" for i in range(k)] if n is None else [[f"c{c} {i} 日本" for i in range(k)] for c in range(n)]
    return ctx_h5.Retrieved(rng.normal(size=lead + (d,)).astype(np.float32), rng.random(lead).astype(np.float32), texts)


@pytest.mark.parametrize("flavor", [ctx_h5.XC, ctx_h5.HV])
def test_txt_ctx_layout(tmp_path, flavor):
    rng = np.random.default_rng(1)
    topk, d = ((16, 16, 16), 512) if flavor == ctx_h5.XC else ((128, 32, 16), 768)
    views = {v: _retrieved(rng, k, d, ctx_h5.N_CROPS[v]) for v, k in zip(ctx_h5.VIEWS, topk, strict=True)}
    path = tmp_path / "txt_ctx.hdf5"
    with ctx_h5.TxtCtxWriter(path, flavor, topk=topk, fdim=d) as w:
        w.add(42, **views)
        w.add(7, **views)
    comp = "gzip" if flavor == ctx_h5.HV else None
    shapes = {ctx_h5.XC: {"whole": (16,), "five": (5, 16), "nine": (9, 16)},
              ctx_h5.HV: {"whole": (128,), "five": (5, 32), "nine": (9, 16)}}[flavor]  # fmt: skip
    with h5py.File(path, "r") as f:
        assert dict(f.attrs) == ({} if flavor == ctx_h5.XC else {"fdim": 768})
        assert sorted(f.keys()) == ["42", "7"]
        g = f["42"]
        assert sorted(g.keys()) == ["five", "nine", "whole"]
        for v, lead in shapes.items():
            assert sorted(g[v].keys()) == ["features", "scores", "texts"]
            assert (g[v]["features"].shape, g[v]["features"].dtype) == (lead + (d,), np.float32)
            assert (g[v]["scores"].shape, g[v]["scores"].dtype) == (lead, np.float32)
            t = g[v]["texts"]
            assert t.shape == lead and (h5py.check_string_dtype(t.dtype).encoding, h5py.check_string_dtype(t.dtype).length) == ("utf-8", None)
            assert t.id.get_type().is_variable_str()
            assert all(ds.compression == comp for ds in g[v].values())
            if comp:
                assert all(ds.compression_opts == 4 for ds in g[v].values())
            assert isinstance(t[()].flat[0], bytes)  # h5py returns bytes, as upstream decodes
    with h5py.File(tmp_path / "up.hdf5", "w") as up:  # upstream's create_dataset(data=list of str)
        up.create_dataset("t", data=views["five"].texts, compression=comp)
        with h5py.File(path, "r") as f:
            assert _props(up["t"]) == _props(f["42/five/texts"])
    back = ctx_h5.read_txt_ctx(path, image_ids=[42])
    assert back.keys() == {42}
    for v in ctx_h5.VIEWS:
        assert np.array_equal(back[42][v].features, views[v].features)
        assert np.array_equal(back[42][v].scores, views[v].scores)
        assert back[42][v].texts == views[v].texts


def test_hv_vis_ctx_layout(tmp_path):
    rng = np.random.default_rng(2)
    pooled, grid = rng.normal(size=512).astype(np.float32), rng.normal(size=(50, 768)).astype(np.float32)
    with ctx_h5.HvVisCtxWriter(tmp_path / "vis_ctx.hdf5") as w:
        w.add(123, pooled, grid)
    with h5py.File(tmp_path / "vis_ctx.hdf5", "r") as f:
        assert dict(f.attrs) == {"fdim_pooled": 512, "fdim_grid": 768}
        g = f["123"]
        assert isinstance(g, h5py.Group) and sorted(g.keys()) == ["grid_features", "pooled_features"]
        assert (g["pooled_features"].shape, g["pooled_features"].dtype, g["pooled_features"].compression) == ((512,), np.float32, "gzip")
        assert (g["grid_features"].shape, g["grid_features"].dtype, g["grid_features"].compression) == ((50, 768), np.float32, "gzip")
    assert ctx_h5.vis_ctx_flavor(tmp_path / "vis_ctx.hdf5") == ctx_h5.HV
    back = ctx_h5.read_vis_ctx(tmp_path / "vis_ctx.hdf5")[123]
    assert np.array_equal(back["pooled"], pooled) and np.array_equal(back["grid"], grid)


@pytest.mark.parametrize("flavor,values,d", [(ctx_h5.XC, "features", 512), (ctx_h5.HV, "values", 768)])
def test_caption_db_layout(tmp_path, flavor, values, d):
    rng = np.random.default_rng(3)
    caps = [f"cap {i} ç" for i in range(7)]
    keys, vals = rng.normal(size=(7, d)).astype(np.float32), rng.normal(size=(7, d)).astype(np.float32)
    path = tmp_path / "caption_db.hdf5"
    with ctx_h5.CaptionDbWriter(path, flavor, key_dim=d, value_dim=d) as w:
        assert w.add_batch(keys[:4], vals[:4], caps[:4]) == 0
        assert w.add_batch(keys[4:], vals[4:], caps[4:]) == 1
    with h5py.File(path, "r") as f:
        assert dict(f.attrs) == {} and sorted(f.keys()) == ["0", "1"]
        assert sorted(f["0"].keys()) == sorted(["keys", values, "captions"])
        assert all(ds.compression == "gzip" for g in f.values() for ds in g.values())
        assert f["1/captions"].shape == (3,) and f["1/captions"].id.get_type().is_variable_str()
        assert f["0/keys"].dtype == f[f"0/{values}"].dtype == np.float32
    k, v, c = ctx_h5.read_caption_db(path)
    assert np.array_equal(k, keys) and np.array_equal(v, vals) and c == caps


def test_writers_are_atomic_and_validate(tmp_path):
    path = tmp_path / "vis_ctx.hdf5"
    with pytest.raises(VlprepError, match="already written"):
        with ctx_h5.XcVisCtxWriter(path) as w:
            w.add(1, np.zeros(768))
            w.add(1, np.zeros(768))
    assert not path.exists() and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(VlprepError, match=r"shape \(512,\), expected \(768\)"):
        with ctx_h5.XcVisCtxWriter(path) as w:
            w.add(1, np.zeros(512))
    r = ctx_h5.Retrieved(np.zeros((16, 512)), np.zeros(16), ["x"] * 15)
    with pytest.raises(VlprepError, match="texts: expected 16 strings"):
        with ctx_h5.TxtCtxWriter(path, ctx_h5.XC, topk=(16, 16, 16), fdim=512) as w:
            w.add(1, r, r, r)
    with pytest.raises(VlprepError, match="unknown context layout"):
        ctx_h5.CaptionDbWriter(path, "other")
    assert not path.exists() and not list(tmp_path.glob(".tmp-*"))


def test_default_weights_unreachable_fall_back_to_random_0_flagged(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("VLPREP_WEIGHTS_URL_CLIP_VIT_B_32", "http://127.0.0.1:9/ViT-B-32.bin")  # nothing listens
    monkeypatch.setenv("VLPREP_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        enc = C.ClipContextEncoder("xmodal-ctx")  # the default spec: "default"
    info = enc.loaded["image"]
    assert enc.is_random and info.spec == "random:0" and "127.0.0.1:9" in info.description
    assert "Using RANDOM weights (random:0)" in caplog.text
    reference, _ = C.load_model("ViT-B-32", "random:0")  # exactly random:0: every pod the same
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(enc.model("image").state_dict()[name], tensor)
