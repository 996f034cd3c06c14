"""Weight/vocabulary spec resolution: download cache with checksums, gs://, local paths, random:<seed>."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from vlprep import VlprepError
from vlprep.models import weights
from vlprep.models.detection.butd import BUTDConfig, load_detector

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def http_files(tmp_path):
    """A loopback HTTP server over a temp folder; yields (base_url, folder, list of requested paths)."""
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _small_checkpoint(path: Path) -> bytes:
    data = {"model": {"a.weight": np.arange(6, dtype=np.float16).reshape(2, 3)}, "__author__": "test"}
    raw = gzip.compress(pickle.dumps(data, protocol=4))
    path.write_bytes(raw)
    return raw


def test_download_is_cached_and_verified(http_files, tmp_path):
    base, root, requests = http_files
    raw = _small_checkpoint(root / "ck.pkl.gz")
    digest = hashlib.sha256(raw).hexdigest()
    cache = tmp_path / "cache"

    first = weights.resolve(f"{base}/ck.pkl.gz", cache_dir=cache)
    assert first.path.read_bytes() == raw and first.sha256 == digest and not first.is_random
    assert first.path.is_relative_to(cache)
    assert len(requests) == 1
    arrays, layout = weights.load_checkpoint(first.path)  # gzip is transparent
    assert layout == "d2" and arrays["a.weight"].dtype == np.float16 and arrays["a.weight"][1, 2] == 5

    again = weights.resolve(f"{base}/ck.pkl.gz#sha256={digest}", cache_dir=cache)
    assert again.path == first.path and len(requests) == 1  # reused, not downloaded again
    assert not list(first.path.parent.glob(".tmp-*"))

    # A cached file that fails its checksum is fetched again.
    first.path.write_bytes(b"truncated")
    fixed = weights.resolve(f"{base}/ck.pkl.gz", cache_dir=cache)
    assert fixed.path.read_bytes() == raw and len(requests) == 2


def test_checksum_mismatch_is_an_error(http_files, tmp_path):
    base, root, requests = http_files
    raw = _small_checkpoint(root / "ck.pkl.gz")
    wrong = "0" * 64
    with pytest.raises(VlprepError) as e:
        weights.resolve(f"{base}/ck.pkl.gz#sha256={wrong}", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert f"{base}/ck.pkl.gz" in msg and wrong in msg and hashlib.sha256(raw).hexdigest() in msg
    target = weights._cache_path(f"{base}/ck.pkl.gz", tmp_path / "cache")
    assert not target.exists()  # nothing half-verified is left in the cache
    assert not list(target.parent.glob(".tmp-*"))
    with pytest.raises(VlprepError, match="sha256"):
        weights.resolve(f"{base}/ck.pkl.gz#sha256=abc", cache_dir=tmp_path / "cache")


def test_download_failure_names_url_and_fix(http_files, tmp_path):
    base, _, _ = http_files
    with pytest.raises(VlprepError, match=r"missing\.pkl: download failed .*local path"):
        weights.resolve(f"{base}/missing.pkl", cache_dir=tmp_path / "cache")


def test_cache_dir_from_environment(http_files, tmp_path, monkeypatch):
    base, root, _ = http_files
    (root / "v.txt").write_text("a\nb\n")
    monkeypatch.setenv("VLPREP_CACHE", str(tmp_path / "envcache"))
    assert weights.default_cache_dir() == tmp_path / "envcache"
    assert weights.resolve(f"{base}/v.txt").path.is_relative_to(tmp_path / "envcache")


@pytest.mark.parametrize("store", ["gs", "s3"], indirect=True)
def test_object_store_spec_is_copied_into_the_cache(store, tmp_path):
    from vlprep import storage

    storage.write_bytes(f"{store}/w/ck.pkl", b"weights-bytes")
    got = weights.resolve(f"{store}/w/ck.pkl", cache_dir=tmp_path / "cache")
    assert got.path.read_bytes() == b"weights-bytes"
    assert got.sha256 == hashlib.sha256(b"weights-bytes").hexdigest()
    with pytest.raises(VlprepError, match="not found"):
        weights.resolve(f"{store}/w/absent.pkl", cache_dir=tmp_path / "cache")


def test_local_path_and_missing_file(tmp_path):
    path = tmp_path / "local.pkl"
    path.write_bytes(b"x")
    assert weights.resolve(path).path == path
    assert weights.resolve(f"{path}#sha256={hashlib.sha256(b'x').hexdigest()}").path == path
    with pytest.raises(VlprepError, match="expected"):
        weights.resolve(f"{path}#sha256={'1' * 64}")
    missing = tmp_path / "nope" / "faster_rcnn_from_caffe_attr.pkl"
    with pytest.raises(VlprepError) as e:
        weights.resolve(missing)
    assert str(missing) in str(e.value) and "random:<seed>" in str(e.value) and "http" in str(e.value)
    with pytest.raises(VlprepError, match=str(missing)):
        load_detector(missing, config=BUTDConfig.tiny())


def test_random_spec_is_deterministic_and_flagged():
    r = weights.resolve("random:7")
    assert r.is_random and r.seed == 7 and r.path is None and "RANDOM" in r.describe()
    with pytest.raises(VlprepError, match="random:<integer seed>"):
        weights.resolve("random:seven")
    cfg = BUTDConfig.tiny()
    a, b, c = (load_detector(spec, config=cfg) for spec in ("random:3", "random:3", "random:4"))
    assert a.is_random and a.weights.seed == 3
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["backbone.res4.0.conv2.weight"], sc["backbone.res4.0.conv2.weight"])
    assert all(torch.isfinite(v).all() for v in sa.values())


def test_vocab_first_synonym_gzip_and_placeholders(tmp_path):
    path = tmp_path / "objects_vocab.txt"
    path.write_text("yolk\ngoal,goals\n  man , men\n\n")
    assert weights.load_vocab(path, size=3, placeholder="object") == ["yolk", "goal", "man"]
    gz = tmp_path / "objects_vocab.txt.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert weights.load_vocab(gz, size=3, placeholder="object") == ["yolk", "goal", "man"]
    with pytest.raises(VlprepError, match=r"3 labels, expected 1600"):
        weights.load_vg_objects(path)
    assert weights.load_vg_objects("random:0")[17] == "object_17"
    assert weights.load_vg_attributes("random:0")[3] == "attribute_3"
    assert len(weights.load_vg_attributes("random:0")) == 400


def test_published_defaults_are_documented():
    assert weights.BUTD_VG_ATTR_WEIGHTS == "http://nlp.cs.unc.edu/models/faster_rcnn_from_caffe_attr.pkl"
    assert weights.VG_OBJECTS_VOCAB.endswith("1600-400-20/objects_vocab.txt")


def test_shared_vg_vocab():
    vocab = SHARED / "fixtures" / "vocab"
    if not vocab.is_dir():
        pytest.skip(f"VG vocabularies not found under {SHARED} (the repo's sibling folder 'shared')")
    objects = weights.load_vg_objects(vocab / "objects_vocab.txt")
    attributes = weights.load_vg_attributes(vocab / "attributes_vocab.txt")
    assert (len(objects), len(attributes)) == (1600, 400)
    assert objects[0] == "yolk" and attributes[0] == "gray" and attributes[1] == "multi colored"
    assert all(label and "," not in label for label in objects + attributes)


# --- "default": the published weights when reachable (a loopback server stands in), else random:0, flagged


def _tiny_butd_checkpoint(path: Path) -> bytes:
    """A BUTD checkpoint in the real torch format: the tiny detector's own state dict, random-initialised."""
    model = load_detector("random:3", config=BUTDConfig.tiny())
    torch.save(model.state_dict(), path)
    return path.read_bytes()


def test_default_downloads_the_published_file_then_uses_the_cache(http_files, tmp_path, monkeypatch, caplog):
    base, root, requests = http_files
    raw = _tiny_butd_checkpoint(root / "butd.pth")
    monkeypatch.setenv("VLPREP_WEIGHTS_URL_BUTD", f"{base}/butd.pth")
    cache = tmp_path / "cache"
    model = load_detector("default", config=BUTDConfig.tiny(), cache_dir=cache)
    assert not model.is_random and model.weights.sha256 == hashlib.sha256(raw).hexdigest()
    reference = load_detector("random:3", config=BUTDConfig.tiny())
    name, tensor = next(iter(reference.state_dict().items()))
    torch.testing.assert_close(model.state_dict()[name], tensor)
    digest, size = (model.weights.path.parent / (model.weights.path.name + ".sha256")).read_text().split()
    assert digest == model.weights.sha256 and int(size) == len(raw)  # recorded at the first download
    (root / "butd.pth").unlink()  # the server no longer has it: the cache answers
    again = weights.resolve("default", model="butd", cache_dir=cache)
    assert again.path == model.weights.path and len(requests) == 1 and not again.is_random


def test_default_tampered_cache_is_downloaded_again_then_refused_if_the_file_changed(http_files, tmp_path,
                                                                                    monkeypatch):
    base, root, requests = http_files
    raw = _tiny_butd_checkpoint(root / "butd.pth")
    monkeypatch.setenv("VLPREP_WEIGHTS_URL_BUTD", f"{base}/butd.pth")
    cache = tmp_path / "cache"
    first = weights.resolve("default", model="butd", cache_dir=cache)
    first.path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # same size, one bit flipped
    fixed = weights.resolve("default", model="butd", cache_dir=cache)
    assert fixed.path.read_bytes() == raw and len(requests) == 2
    (root / "butd.pth").write_bytes(raw + b"changed upstream")
    first.path.write_bytes(b"truncated")
    with pytest.raises(VlprepError, match="differs from the first download"):
        weights.resolve("default", model="butd", cache_dir=cache)
    assert len(requests) == 3
    pinned = hashlib.sha256(raw + b"changed upstream").hexdigest()  # a #sha256= pin wins over the record
    assert weights.resolve(f"{base}/butd.pth#sha256={pinned}", cache_dir=cache).sha256 == pinned


def test_default_unreachable_falls_back_to_random_0_flagged(http_files, tmp_path, monkeypatch, caplog):
    base, _, _ = http_files
    monkeypatch.setenv("VLPREP_WEIGHTS_URL_BUTD", f"{base}/gone.pth")
    with caplog.at_level("WARNING"):
        model = load_detector("default", config=BUTDConfig.tiny(), cache_dir=tmp_path / "cache")
    assert model.is_random and model.weights.seed == 0 and "gone.pth" in model.weights.fallback
    assert "Using RANDOM weights (random:0)" in caplog.text and "butd" in caplog.text
    reference = load_detector("random:0", config=BUTDConfig.tiny())
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)
    matcher = weights.resolve("default", model="matcher")  # none published
    assert matcher.is_random and matcher.fallback == "none are published"
    with pytest.raises(VlprepError, match="need a model"):
        weights.resolve("default")


# --- plan time: "default" becomes one concrete spec, recorded in the settings every shard reads


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def test_regions_plan_pins_default_once_for_every_shard(http_files, tmp_path, monkeypatch, sample):
    from vlprep.stages import regions

    base, root, requests = http_files
    raw = _small_checkpoint(root / "butd.pkl")  # the plan only downloads and hashes; it loads nothing
    monkeypatch.setenv("VLPREP_WEIGHTS_URL_BUTD", f"{base}/butd.pkl")
    monkeypatch.setenv("VLPREP_CACHE", str(tmp_path / "cache"))
    asked = regions.Settings(images=str(sample / "images"), weights="default")
    regions.plan(str(tmp_path / "online"), asked, num_shards=2)
    online = regions.STAGE.open(str(tmp_path / "online")).settings()
    assert online.weights == f"{base}/butd.pkl#sha256={_sha(raw)}" and online.weights_fallback == ""
    (root / "butd.pkl").unlink()  # a shard resolves the recorded spec: the plan's file, from the cache
    assert weights.resolve(online.weights).path.read_bytes() == raw and requests == ["/butd.pkl"]

    monkeypatch.setenv("VLPREP_WEIGHTS_URL_BUTD", f"{base}/gone.pkl")  # the network is gone
    regions.plan(str(tmp_path / "offline"), asked, num_shards=2)
    offline = regions.STAGE.open(str(tmp_path / "offline")).settings()
    assert offline.weights == "random:0" and "gone.pkl" in offline.weights_fallback
    assert offline.fingerprint() != online.fingerprint()  # real and random shards are never mixed

    regions.plan(str(tmp_path / "tiny"), dataclasses.replace(asked, arch="tiny"))
    tiny = regions.STAGE.open(str(tmp_path / "tiny")).settings()
    assert (tiny.weights, tiny.weights_fallback) == ("random:0", "arch tiny: the published weights are for the "
                                                                  "full detector")
    assert requests == ["/butd.pkl", "/gone.pkl"]  # tiny asked nothing: the published file cannot fit it
    explicit = dataclasses.replace(asked, weights="random:7")
    regions.plan(str(tmp_path / "explicit"), explicit)
    assert regions.STAGE.open(str(tmp_path / "explicit")).settings() == explicit


def test_xlxmert_plan_pins_default(http_files, tmp_path, monkeypatch, sample):
    from vlprep.stages import xlxmert

    base, root, requests = http_files
    raw = _small_checkpoint(root / "detectron_model.pth")
    monkeypatch.setenv("VLPREP_WEIGHTS_URL_X152", f"{base}/detectron_model.pth")
    monkeypatch.setenv("VLPREP_CACHE", str(tmp_path / "cache"))
    asked = xlxmert.Settings(images=str(sample / "images"), weights="default")
    xlxmert.plan(str(tmp_path / "out"), asked)
    recorded = xlxmert.extraction_stage("grid8").open(str(tmp_path / "out")).settings()
    assert (recorded.weights, recorded.weights_fallback) == (f"{base}/detectron_model.pth#sha256={_sha(raw)}", "")
    xlxmert.plan(str(tmp_path / "tiny"), dataclasses.replace(asked, arch="tiny"))
    tiny = xlxmert.extraction_stage("grid8").open(str(tmp_path / "tiny")).settings()
    assert tiny.weights == "random:0" and tiny.weights_fallback.startswith("arch tiny") and len(requests) == 1


def test_clip_default_is_the_openai_tag_file_pinned_and_loads_from_the_cache(http_files, tmp_path, monkeypatch):
    from vlprep.models import clip

    base, root, requests = http_files
    tiny = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32,
                                            "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    model, _ = clip.load_model("ViT-B-32", "random:5", tiny)
    torch.save(model.state_dict(), root / "open_clip_pytorch_model.bin")  # open_clip's own file format
    raw = (root / "open_clip_pytorch_model.bin").read_bytes()
    assert clip.published_weights("ViT-B-32") == (
        "https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/open_clip_pytorch_model.bin")
    monkeypatch.setenv("VLPREP_WEIGHTS_URL_CLIP_VIT_B_32", f"{base}/open_clip_pytorch_model.bin")
    monkeypatch.setenv("VLPREP_CACHE", str(tmp_path / "cache"))
    spec, why = clip.pin_weights("default", "ViT-B-32")
    assert (spec, why) == (f"{base}/open_clip_pytorch_model.bin#sha256={_sha(raw)}", "")
    (root / "open_clip_pytorch_model.bin").unlink()
    loaded, info = clip.load_model("ViT-B-32", spec, tiny)  # what a shard does with the recorded spec
    assert not info.is_random and requests == ["/open_clip_pytorch_model.bin"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert clip.pin_weights("openai", "ViT-B-32") == ("openai", "")  # explicit tags stay open_clip's
    spec, why = clip.pin_weights("default", "ViT-B-32", tiny)  # a replaced architecture: random, no download
    assert spec == "random:0" and "model_cfg" in why and len(requests) == 1
