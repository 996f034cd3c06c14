"""The matcher: Maria's checkpoint layout, images, loss, training with resume, and full-size parity."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from matching_data import coco_like, write_vocab

from vlprep import VlprepError
from vlprep.data import images as imgs
from vlprep.data.lxmert_json import jsonl_pairs, lxmert_image_ids, lxmert_pairs
from vlprep.formats import vokens as fmt
from vlprep.models.matching import keys as mk
from vlprep.models.matching import train as tr
from vlprep.models.matching import vokenize as vk
from vlprep.models.matching.config import MARIA, TINY, get_config
from vlprep.models.matching.images import eval_transform, read_rgb
from vlprep.models.matching.loss import sent_batchwise_recall, sent_paired_hinge_rank_loss
from vlprep.models.matching.model import (
    build_bert,
    build_matcher,
    build_resnet,
    load_matcher,
    maria_state_dict,
)
from vlprep.models.matching.tokenizer import encode_captions, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- model and checkpoint layout


def test_state_dict_is_marias_layout_and_round_trips(tmp_path):
    model = load_matcher("random:3", TINY)
    state = maria_state_dict(model)
    keys = list(state)
    assert keys[0] == "lang_model.backbone.embeddings.word_embeddings.weight"
    assert keys.index("lang_model.mlp.linears.0.weight") < keys.index("visn_model.backbone.conv1.weight")
    assert keys[-2:] == ["visn_model.mlp.linears.2.weight", "visn_model.mlp.linears.2.bias"]
    assert "visn_model.backbone.bn1.running_var" in state and "visn_model.backbone.fc.weight" not in state
    assert not any("num_batches_tracked" in k or "position_ids" in k for k in keys)
    # an old-transformers checkpoint, saved through DDP: legacy buffer and module. prefixes are accepted
    legacy = {"module." + k: v for k, v in state.items()}
    legacy["module.lang_model.backbone.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save(legacy, tmp_path / "BEST.pth")
    loaded = load_matcher(str(tmp_path / "BEST.pth"), TINY)
    for k, v in maria_state_dict(loaded).items():
        assert torch.equal(v, state[k]), k
    ids, mask = torch.tensor([[101, 7, 9, 102]]), torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(loaded.lang_model(ids, mask), model.lang_model(ids, mask))


def test_wrong_checkpoints_are_refused_with_the_reason(tmp_path):
    state = maria_state_dict(load_matcher("random:3", TINY))
    del state["visn_model.mlp.linears.0.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(VlprepError, match="missing.*visn_model.mlp.linears.0.bias"):
        load_matcher(str(tmp_path / "missing.pth"), TINY)
    torch.save(maria_state_dict(load_matcher("random:3", TINY)), tmp_path / "tiny.pth")
    with pytest.raises(VlprepError, match="wrong shape"):
        load_matcher(str(tmp_path / "tiny.pth"), MARIA)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module, like BEST.pth.model
    with pytest.raises(VlprepError, match="not a readable matcher state dict"):
        load_matcher(str(tmp_path / "module.pth"), TINY)


def test_outputs_are_unit_vectors_and_backbones_frozen(tmp_path):
    model = build_matcher(TINY, bert_weights="random:1", resnet_weights="random:2")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp." in n for n in trainable)
    assert set(model.head_state()) == {n for n in model.state_dict() if ".mlp." in n}
    ids, mask = encode_captions(load_tokenizer(str(write_vocab(tmp_path / "vocab"))), ["a red circle", "blue"], 8)
    assert ids.shape == (2, 8) and ids[0, 0] == 101 and mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    model.eval()
    with torch.no_grad():
        lang, visn = model(ids, mask, torch.randn(3, 3, TINY.crop, TINY.crop))
    assert lang.shape == (2, TINY.dim) and visn.shape == (3, TINY.dim)
    np.testing.assert_allclose(lang.norm(dim=1).numpy(), 1, atol=1e-6)
    np.testing.assert_allclose(visn.norm(dim=1).numpy(), 1, atol=1e-6)


def test_backbone_weight_specs(tmp_path):
    """torchvision-format ResNeXt files (plain BatchNorm, fc) and BERT state dicts, prefixed or HF folders."""
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    ref = ResNet(Bottleneck, list(TINY.resnet_layers), groups=TINY.resnet_groups,
                 width_per_group=TINY.resnet_width_per_group)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(ref.state_dict(), tmp_path / "resnext.pth")
    net, dim = build_resnet(TINY, str(tmp_path / "resnext.pth"))
    ref.fc = torch.nn.Identity()
    x = torch.randn(2, 3, TINY.crop, TINY.crop)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref.eval()(x), rtol=1e-4, atol=1e-5)
    assert dim == 2048
    bert = build_bert(TINY, "random:4")
    prefixed = {"bert." + k: v for k, v in bert.state_dict().items()} | {"cls.predictions.bias": torch.zeros(3)}
    torch.save(prefixed, tmp_path / "pytorch_model.bin")
    bert.save_pretrained(tmp_path / "bert-folder")
    for spec in (tmp_path / "pytorch_model.bin", tmp_path / "bert-folder"):
        loaded = build_bert(TINY, str(spec)).state_dict()
        assert all(torch.equal(v, loaded[k]) for k, v in bert.state_dict().items())
    with pytest.raises(VlprepError, match="hidden_size is 32"):
        build_bert(MARIA, str(tmp_path / "bert-folder"))
    with pytest.raises(VlprepError, match="does not fit"):
        build_resnet(MARIA, str(tmp_path / "resnext.pth"))


def test_configs():
    assert MARIA.dim == 512 and MARIA.bert["hidden_size"] * len(MARIA.lang_layers) == 3072
    assert get_config(TINY.to_dict()) == TINY and get_config("maria") is MARIA
    with pytest.raises(VlprepError, match="unknown matcher config"):
        get_config("large")


# ---------------------------------------------------------------- images and loss


def test_image_decoding_as_default_loader(tmp_path):
    from PIL import Image

    rgb = Image.new("RGB", (40, 30), (200, 30, 60))
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG")
    rgb.convert("L").save(tmp_path / "gray.jpg", "JPEG")
    rgb.convert("RGBA").save(tmp_path / "png.jpg", "PNG")
    for name in ("cmyk.jpg", "gray.jpg", "png.jpg"):
        im = read_rgb(str(tmp_path / name))
        with Image.open(tmp_path / name) as ref:  # torchvision's default_loader: convert("RGB")
            assert im.mode == "RGB" and np.array_equal(np.asarray(im), np.asarray(ref.convert("RGB")))
    data = (tmp_path / "cmyk.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("hello")
    for name in ("cut.jpg", "text.jpg", "absent.jpg"):
        with pytest.raises(imgs.BadImage):
            read_rgb(str(tmp_path / name))
    x = eval_transform(MARIA)(Image.new("RGB", (1000, 60)))
    assert x.shape == (3, 224, 224)


def test_paired_hinge_loss_and_recall_by_hand():
    lang = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1], [1, 1], [1, -1]]), dim=1)
    visn = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1, 0], [1, 1], [0, 1]]), dim=1)
    s = lang @ visn.t()
    want = sum(max(0.0, 0.5 - s[i, i] + s[i, (i + 2) % 4]) for i in range(4))
    assert float(sent_paired_hinge_rank_loss(lang, visn, 0.5)) == pytest.approx(float(want))
    with pytest.raises(ValueError):
        sent_paired_hinge_rank_loss(lang[:3], visn[:3])
    # row 0's own image ties for the best score; row 3's own image is the worst of 4
    recall = sent_batchwise_recall(lang, visn, recalls=(1, 3))
    assert recall[3] == 1.0 and recall[1] == pytest.approx(0.5)


# ---------------------------------------------------------------- training data


def test_pairs_from_lxmert_json_and_caption_jsonl(tmp_path):
    entries = coco_like(tmp_path / "images", "train2014", 3)
    (tmp_path / "mscoco_train.json").write_text(json.dumps(entries))
    pairs = lxmert_pairs([str(tmp_path / "mscoco_train.json")], str(tmp_path / "images"))
    assert len(pairs) == 9 and pairs[1].uid == "COCO_train2014_000000000001:mscoco:1"
    assert pairs[0].image == str(tmp_path / "images" / "train2014" / "COCO_train2014_000000000001.jpg")
    assert lxmert_image_ids(str(tmp_path / "mscoco_train.json"))[2] == "COCO_train2014_000000000003"
    lines = [json.dumps({"sentences": e["sentf"]["mscoco"][:2], "id": k + 1}) for k, e in enumerate(entries)]
    (tmp_path / "train_caption.jsonl").write_text("\n".join(lines) + "\n")
    from_jsonl = jsonl_pairs(str(tmp_path / "train_caption.jsonl"), str(tmp_path / "images"))
    assert [p.image for p in from_jsonl[::2]] == [p.image for p in pairs[::3]]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"sentences": ["x"], "id": 77}) + "\n")
    with pytest.raises(VlprepError, match="no COCO image with id 77"):
        jsonl_pairs(str(tmp_path / "bad.jsonl"), str(tmp_path / "images"))


# ---------------------------------------------------------------- training


@pytest.fixture
def one_thread():
    """The tiny model trains fastest on one thread (and the test machine's cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train")
    train = coco_like(root / "images", "train2014", 16)
    valid = coco_like(root / "images", "val2014", 8, start=100)
    (root / "mscoco_train.json").write_text(json.dumps(train))
    (root / "mscoco_minival.json").write_text(json.dumps(valid))
    return {"root": root, "vocab": str(write_vocab(root / "vocab")),
            "train": {"lxmert": [str(root / "mscoco_train.json")], "image_root": str(root / "images")},
            "valid": {"lxmert": [str(root / "mscoco_minival.json")], "image_root": str(root / "images")}}


def make_job(data: dict, out: Path, epochs: int, **settings) -> tr.TrainJob:
    base = {"epochs": epochs, "batch_size": 8, "valid_batch_size": 8, "max_len": 16, "num_workers": 0}
    return tr.TrainJob(out=str(out), train=data["train"], valid=data.get("valid_as", data["valid"]),
                       config="tiny", tokenizer=data["vocab"], bert_weights="random:1", resnet_weights="random:2",
                       settings=tr.TrainSettings(**{**base, **settings}))


def test_training_lowers_the_loss_and_writes_best_in_marias_layout(train_data, tmp_path, one_thread):
    data = {**train_data, "valid_as": train_data["train"]}  # validation on the training pairs: fitting them
    summary = tr.run(make_job(data, tmp_path, 8))
    hist = summary["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 9))
    assert hist[-1]["valid_loss"] < hist[0]["valid_loss"] - 0.05
    best = min(hist, key=lambda h: h["valid_loss"])
    assert summary["best_epoch"] == best["epoch"]
    assert json.loads((tmp_path / "BEST.json").read_text())["epoch"] == best["epoch"]
    state = torch.load(tmp_path / "BEST.pth", weights_only=True)
    assert list(state) == list(build_matcher(TINY, bert_weights="random:1", resnet_weights="random:2").state_dict())
    load_matcher(str(tmp_path / "BEST.pth"), TINY)
    assert json.loads((tmp_path / "metrics.json").read_text()) == hist


def _strip_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_resume_continues_exactly_where_it_stopped(train_data, tmp_path, one_thread):
    whole = tr.run(make_job(train_data, tmp_path / "whole", 3))
    tr.run(make_job(train_data, tmp_path / "split", 2))
    first = tr.read_checkpoint(str(tmp_path / "split"))
    assert first["epoch"] == 2
    resumed = tr.run(make_job(train_data, tmp_path / "split", 3))
    assert _strip_seconds(resumed["history"]) == _strip_seconds(whole["history"])
    a, b = tr.read_checkpoint(str(tmp_path / "whole")), tr.read_checkpoint(str(tmp_path / "split"))
    assert a["epoch"] == b["epoch"] == 3
    for k in a["heads"]:
        assert torch.equal(a["heads"][k], b["heads"][k]), k
    assert (tmp_path / "whole" / "BEST.pth").read_bytes() == (tmp_path / "split" / "BEST.pth").read_bytes()
    again = tr.run(make_job(train_data, tmp_path / "split", 3))  # nothing left to do
    assert _strip_seconds(again["history"]) == _strip_seconds(whole["history"])
    with pytest.raises(VlprepError, match="different training job"):
        tr.run(make_job(train_data, tmp_path / "split", 4, lr=5e-4))


def test_a_killed_run_resumes_from_its_last_checkpoint(train_data, tmp_path, one_thread):
    """SIGKILL a training process after its first checkpoint; the rerun matches an uninterrupted run."""
    job = make_job(train_data, tmp_path / "killed", 40)
    (tmp_path / "job.json").write_text(json.dumps(job.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vlprep.models.matching.train", str(tmp_path / "job.json")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "killed" / "metrics.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = tr.read_checkpoint(str(tmp_path / "killed"))["epoch"]
    assert 1 <= done < 40
    assert not list((tmp_path / "killed").glob(".tmp-*"))
    resumed = tr.run(make_job(train_data, tmp_path / "killed", done + 1))
    whole = tr.run(make_job(train_data, tmp_path / "whole", done + 1))
    assert _strip_seconds(resumed["history"]) == _strip_seconds(whole["history"])


def test_two_processes_under_torchrun(train_data, tmp_path, one_thread):
    job = make_job(train_data, tmp_path / "ddp", 1)
    (tmp_path / "job.json").write_text(json.dumps(job.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vlprep.models.matching.train",
                          str(tmp_path / "job.json")], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["processes"] == 2 and summary["history"][0]["epoch"] == 1
    assert tr.read_checkpoint(str(tmp_path / "ddp"))["epoch"] == 1 and (tmp_path / "ddp" / "BEST.pth").exists()


def test_bad_training_sizes_are_explained(train_data, tmp_path, one_thread):
    with pytest.raises(VlprepError, match="must be even"):
        tr.run(make_job(train_data, tmp_path, 1, batch_size=7))
    with pytest.raises(VlprepError, match="fewer than one batch"):
        tr.run(make_job(train_data, tmp_path, 1, valid_batch_size=64))


# ---------------------------------------------------------------- full size, against Maria's own outputs

GOLDEN_TOL = {"image_backbone": 1e-4, "image_key": 1e-5, "sent_cls_last4": 1e-4, "sent_embedding": 1e-5}


@pytest.fixture(scope="session")
def maria_best(shared, tmp_path_factory) -> Path:
    """Maria's matcher checkpoint, made by the fixture's generator (about a minute), checked against its manifest."""
    out = tmp_path_factory.mktemp("maria")
    script = shared / "fixtures" / "maria" / "make_matcher.py"
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True,
                   env={**os.environ, "MAKE_MATCHER_THREADS": "2"}, timeout=900)
    want = json.loads((shared / "fixtures" / "maria" / "BEST.pth.manifest.json").read_text())
    got = json.loads((out / "BEST.pth.manifest.json").read_text())
    assert got == want
    return out / "BEST.pth"


@pytest.fixture(scope="session")
def maria(maria_best):
    torch.set_num_threads(2)
    return load_matcher(str(maria_best), "maria")


@pytest.fixture(scope="session")
def golden(shared) -> dict:
    with np.load(shared / "fixtures" / "maria" / "golden_embeddings.npz") as z:
        return {k: z[k] for k in z.files}


def _report(name: str, got: np.ndarray, want: np.ndarray) -> float:
    diff = float(np.abs(got - want).max())
    print(f"parity {name}: max abs diff {diff:.3e}")
    return diff


@pytest.mark.slow
def test_loaded_tensors_are_the_manifests(maria, shared):
    manifest = json.loads((shared / "fixtures" / "maria" / "BEST.pth.manifest.json").read_text())["tensors"]
    state = maria.state_dict()
    assert list(state) == list(manifest)
    for k, v in state.items():
        assert hashlib.sha256(v.numpy().astype("<f4").tobytes()).hexdigest() == manifest[k]["sha256"], k


@pytest.mark.slow
def test_image_embeddings_match_marias(maria, golden, shared):
    images = shared / "fixtures" / "maria" / "images"
    x = torch.stack([eval_transform(MARIA)(read_rgb(str(images / f"{i}.jpg"))) for i in golden["image_ids"]])
    assert _report("image_input", x.numpy(), golden["image_input"]) == 0.0
    with torch.no_grad():
        feats = maria.visn_model.features(x).numpy()
        keys = maria.visn_model.mlp(torch.from_numpy(feats))
        keys = (keys / keys.norm(dim=1, keepdim=True)).numpy()
    assert _report("image_backbone", feats, golden["image_backbone"]) < GOLDEN_TOL["image_backbone"]
    assert _report("image_key", keys, golden["image_key"]) < GOLDEN_TOL["image_key"]


@pytest.mark.slow
def test_sentence_embeddings_match_marias(maria, golden):
    lines = []
    for row in golden["sent_input_ids"]:
        last_sep = int(np.flatnonzero(row == 102)[-1])
        lines.append(row[1:last_sep])
    ids, mask = vk.query_batch(lines, cls_id=101, sep_id=102, pad_id=0)
    assert np.array_equal(ids.numpy(), golden["sent_input_ids"])
    assert np.array_equal(mask.numpy().astype(np.int64), golden["sent_attention_mask"])
    with torch.no_grad():
        cls = maria.lang_model.cls_features(ids, mask).numpy()
        emb = maria.lang_model(ids, mask).numpy()
    assert _report("sent_cls_last4", cls, golden["sent_cls_last4"]) < GOLDEN_TOL["sent_cls_last4"]
    assert _report("sent_embedding", emb, golden["sent_embedding"]) < GOLDEN_TOL["sent_embedding"]


@pytest.mark.slow
def test_keys_match_upstreams_files(maria, shared, tmp_path, monkeypatch):
    fixture = shared / "fixtures" / "maria"
    (tmp_path / "data" / "open_images").mkdir(parents=True)
    (tmp_path / "data" / "open_images" / "images").symlink_to(fixture / "images")
    monkeypatch.chdir(tmp_path)  # upstream's OI_ROOT was data/open_images: same root, same .path
    image_set = mk.image_set_from_ids("open_images", str(fixture / "open_images.ids"), "data/open_images/images")
    bounds = [0, 10, 20, len(image_set.ids)]
    parts, failed = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        parts.append(str(tmp_path / f"part{i}.npz"))
        failed += mk.extract_keys(maria.visn_model, image_set, a, b, parts[-1], transform=eval_transform(MARIA),
                                  batch_size=10)["failed"]
    mk.merge_keys(parts, "keys", "open_images")
    assert sorted(f["item"] for f in failed) == ["00000000deadbeef", "7992347eb8385456", "b2d9765207ea5c5c"]
    for suffix in (".path", ".ids"):
        assert (tmp_path / "keys" / f"open_images{suffix}").read_bytes() == (fixture / "keys" / f"open_images{suffix}").read_bytes()
    with h5py.File(tmp_path / "keys" / "open_images.hdf5") as ours, h5py.File(fixture / "keys" / "open_images.hdf5") as up:
        assert ours["keys"].shape == up["keys"].shape == (24, 512) and ours["keys"].dtype == up["keys"].dtype
        assert ours["keys"].chunks is None and ours["keys"].compression is None
        assert _report("upstream keys hdf5", ours["keys"][:], up["keys"][:]) < GOLDEN_TOL["image_key"]


@pytest.mark.slow
def test_vokens_of_marias_sentences_against_upstream_keys(maria, golden, shared, tmp_path):
    lines = [row[1: int(np.flatnonzero(row == 102)[-1])].astype(np.int32) for row in golden["sent_input_ids"]]
    prefix = str(tmp_path / "held_out.txt.bert-base-uncased")
    fmt.write_tokens(prefix, [(np.array([len(x) for x in lines]), np.concatenate(lines))])
    key_sets = vk.load_key_sets(str(shared / "fixtures" / "maria" / "keys"), ["open_images"])
    tok = load_tokenizer(str(shared / "fixtures" / "maria" / "bert-base-uncased"))
    vk.vokenize_range(prefix, 0, 5, str(tmp_path / "part.npz"), vk.Vokenizer(maria.lang_model, tok, key_sets))
    out = vk.merge_vokens([str(tmp_path / "part.npz")], str(tmp_path), "held_out.txt", key_sets)
    assert Path(out["vokens"]).name == "held_out.txt.open_images.24"
    names = [Path(p).name for p in key_sets.paths]
    want = [[names[j] for j in np.argsort(-(key_sets.keys @ e), kind="stable")[:5]] for e in golden["sent_embedding"]]
    assert fmt.read_vokens(out["vokens"]) == want
    assert Path(out["vokens"] + ".ids").read_text() == "".join(
        f"open_images/{i}\n" for i in (shared / "fixtures" / "maria" / "keys" / "open_images.ids").read_text().split())

