"""Maria's vokenization as a stage on the sample: shard invariance, resume, bad images, vokens against brute
force, training as a step (resume, torchrun), the CLI, the components and the local pipeline run.

A TINY matcher (random weights, the real architecture) and the sample's own tokenizer keep it fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vlprep import VlprepError, stage
from vlprep.formats import vokens as fmt
from vlprep.models.matching.config import TINY
from vlprep.models.matching.model import load_matcher
from vlprep.models.matching.tokenizer import load_tokenizer
from vlprep.models.matching.vokenize import query_batch
from vlprep.stages import vokens as V

CPU = stage.Runtime(device="cpu", num_workers=0)
VOKENS = "valid.pkl.txt.coco_sample.6"
TOKENS = "valid.pkl.txt.wordpiece-sample"
FILES = [f"tokens/{TOKENS}", f"tokens/{TOKENS}.line", f"tokens/{TOKENS}.hdf5", "keys/coco_sample.hdf5",
         "keys/coco_sample.path", "keys/coco_sample.ids", f"vokens/{VOKENS}", f"vokens/{VOKENS}.ids"]


def sample_settings(sample: Path, **kw) -> V.Settings:
    base = dict(corpus=str(sample / "vokens" / "valid.pkl.txt"), images=str(sample / "vokens" / "mscoco_sample.json"),
                image_set="coco_sample", image_root=str(sample / "images"),
                tokenizer=str(sample / "vokens" / "wordpiece-sample"), matcher="random:0", config="tiny", key_batch=2,
                block_lines=8, page_lines=8)
    return V.Settings(**{**base, **kw})


def differing(a: Path, b: Path, names=FILES) -> list[str]:
    return [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]


@pytest.fixture(scope="module")
def one(tmp_path_factory, sample) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vokens1")
    return out, V.run(str(out), sample_settings(sample), runtime=CPU)


def test_outputs_and_counts(one, sample):
    out, summary = one
    corpus = (sample / "vokens" / "valid.pkl.txt").read_text().splitlines()
    assert summary["lines"] == len(corpus) == 36  # one entry per line by default
    assert summary["tokenize"]["empty_lines"] == 3 and summary["tokenize"]["retrieval_input"] == "context"
    assert summary["random_weights"] is True and summary["images"] == 6
    rows = fmt.read_vokens(str(out / "vokens" / VOKENS))
    assert len(rows) == 36 and all(len(r) == 5 and len(set(r)) == 5 for r in rows)
    ids = (out / "vokens" / f"{VOKENS}.ids").read_text().splitlines()
    assert ids == [f"coco_sample/{e['img_id']}" for e in json.loads((sample / "vokens" / "mscoco_sample.json").read_text())]
    html = (out / "vokens" / V.REPORT).read_text()
    assert "RANDOM matcher weights" in html and html.count("<img src='data:image/png;base64,") == 8 * 5
    assert "rocket launch last night" in html  # the sample lines' text beside their images


def test_same_files_for_any_shard_count_and_resume(one, sample, tmp_path):
    out = tmp_path / "three"
    settings = sample_settings(sample)
    summary = V.run(str(out), settings, tokenize_shards=3, key_shards=2, vokenize_shards=3, runtime=CPU)
    assert summary["shards"] == 3 and differing(out, one[0]) == []
    again = V.run(str(out), settings, tokenize_shards=3, key_shards=2, vokenize_shards=3, runtime=CPU)
    assert again["skipped_shards"] == {"tokenize": 3, "keys": 2, "vokenize": 3}
    lost = out / "vokens" / "_work" / "vokens" / TOKENS / "shard-00001-of-00003.done.json"
    lost.unlink()
    with pytest.raises(VlprepError, match="shard 1 of 3 has no done-marker"):
        V.merge(str(out / "vokens"), TOKENS)
    redone = V.run(str(out), settings, tokenize_shards=3, key_shards=2, vokenize_shards=3, runtime=CPU)
    assert redone["skipped_shards"]["vokenize"] == 2 and differing(out, one[0]) == []
    other = V.run(str(out), sample_settings(sample, matcher="random:1"), tokenize_shards=3, key_shards=2,
                  vokenize_shards=3, runtime=CPU)  # other weights: keys and vokens redone, tokens kept
    assert other["skipped_shards"] == {"tokenize": 3, "keys": 0, "vokenize": 0}


def test_vokens_are_the_exact_top5_of_each_line(one, sample):
    """Each entry through the sentence tower alone, inner products with every key: the same five images."""
    out, _ = one
    model = load_matcher("random:0", TINY)
    tok = load_tokenizer(str(sample / "vokens" / "wordpiece-sample"))
    keys, paths, _ = fmt.read_keys(str(out / "keys"), "coco_sample")
    prefix = str(out / "tokens" / TOKENS)
    lines = fmt.read_token_lines(prefix, 0, 36)
    rows = fmt.read_vokens(str(out / "vokens" / VOKENS))
    for ids, got in zip(lines, rows, strict=True):
        q, mask = query_batch([ids], cls_id=tok.cls_token_id, sep_id=tok.sep_token_id, pad_id=tok.pad_token_id)
        with torch.no_grad():
            emb = model.lang_model(q, mask).numpy()[0]
        scores = keys @ emb
        top = np.argsort(-scores, kind="stable")[:5]
        assert sorted(scores[top])[0] - sorted(scores)[-6] > 1e-6  # no tie at the cut
        assert got == [Path(paths[j]).name for j in top]


def test_drop_empty_and_bad_images(sample, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in sorted((sample / "images").rglob("*.jpg")):
        shutil.copy(p, folder / p.name)
    good = next(folder.iterdir()).read_bytes()
    (folder / "zz_truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "aa_text.jpg").write_text("not an image")
    settings = sample_settings(sample, images=str(folder), image_root="", image_set="open_images", drop_empty=True)
    summary = V.run(str(tmp_path / "out"), settings, key_shards=3, runtime=CPU)
    assert summary["lines"] == 33 and summary["tokenize"]["dropped_lines"] == 3
    failed = summary["keys"]["open_images"]["failed"]
    assert sorted(f["item"] for f in failed) == ["aa_text", "zz_truncated"]
    ids = (tmp_path / "out" / "keys" / "open_images.ids").read_text().split()
    assert ids == sorted(p.stem for p in (sample / "images").rglob("*.jpg"))  # kept, in the set's order
    html = (tmp_path / "out" / "vokens" / V.REPORT).read_text()
    assert "Skipped images (2)" in html and "zz_truncated" in html


def test_errors_name_the_fix(sample, tmp_path, one):
    with pytest.raises(VlprepError, match="give image_root"):
        V.image_set_for(V.KeySettings(images=str(sample / "vokens" / "mscoco_sample.json"), image_set="x",
                                      matcher="random:0"))
    with pytest.raises(VlprepError, match="topk 7"):
        V.plan(str(tmp_path), V.make_settings(tokens=str(one[0] / "tokens"), keys=str(one[0] / "keys"),
                                              matcher="random:0", config="tiny", topk=7))
    with pytest.raises(VlprepError, match="keys of dimension 32, the maria matcher gives 512"):
        V.plan(str(tmp_path), V.make_settings(tokens=str(one[0] / "tokens"), keys=str(one[0] / "keys"),
                                              matcher="random:0", config="maria"))
    with pytest.raises(VlprepError, match="no such file"):
        V.matcher(str(tmp_path / "BEST.pth"))
    with pytest.raises(VlprepError, match="holds no tokenized corpus"):
        V.find_tokens(str(tmp_path))


# ---------------------------------------------------------------- training as a step


def tiny_job(sample: Path, out: Path, epochs: int):
    from vlprep.models.matching.train import TrainSettings

    captions = str(sample / "vokens" / "mscoco_sample.json")
    return V.train_job(str(out), train=captions, valid=captions, image_root=str(sample / "images"), config="tiny",
                       tokenizer=str(sample / "vokens" / "wordpiece-sample"), bert_weights="random:1",
                       resnet_weights="random:2",
                       settings=TrainSettings(epochs=epochs, batch_size=4, valid_batch_size=4, max_len=16, num_workers=0))


def test_train_writes_best_and_resumes(sample, tmp_path):
    first = V.train(tiny_job(sample, tmp_path, 1), nproc=1)
    assert first["matcher"] == str(tmp_path / "BEST.pth") and first["processes"] == 1
    more = V.train(tiny_job(sample, tmp_path, 2), nproc=1)  # resumes after epoch 1
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and more["epochs"] == 2
    load_matcher(more["matcher"], TINY)


def test_train_launches_torchrun_for_several_processes(sample, tmp_path):
    summary = V.train(tiny_job(sample, tmp_path, 1), nproc=2)
    assert summary["processes"] == 2 and summary["best_epoch"] == 1
    assert (tmp_path / "BEST.pth").exists() and (tmp_path / "checkpoint.pth").exists()


# ---------------------------------------------------------------- the CLI, the components, the local pipeline


def test_cli_runs_each_step(one, sample, tmp_path):
    from vlprep.cli import main

    s = sample_settings(sample)
    assert main(["vokens", "tokenize", "--corpus", s.corpus, "--tokenizer", s.tokenizer, "--out", str(tmp_path / "tokens"),
                 "--shards", "2", "--block-lines", "8"]) == 0
    assert main(["vokens", "keys", "--images", s.images, "--image-root", s.image_root, "--set", "coco_sample",
                 "--matcher", "random:0", "--config", "tiny", "--out", str(tmp_path / "keys"), "--batch-size", "2",
                 "--shards", "2", "--device", "cpu", "--workers", "0"]) == 0
    assert main(["vokens", "vokenize", "--tokens", str(tmp_path / "tokens"), "--keys", str(tmp_path / "keys"),
                 "--matcher", "random:0", "--config", "tiny", "--out", str(tmp_path / "vokens"), "--shards", "3",
                 "--page-lines", "8", "--device", "cpu"]) == 0
    assert differing(tmp_path, one[0]) == []
    assert main(["vokens", "keys", "--images", s.images, "--set", "x", "--matcher", "random:0", "--out",
                 str(tmp_path / "k2")]) == 2  # an LXMERT JSON without --image-root: one error line


def test_components_chain(one, sample, tmp_path):
    from kfp_harness import load, run_component

    spec, _ = load("vokens")
    out = tmp_path / "store"
    s = sample_settings(sample)
    vals, _ = run_component(spec, "vokens-matcher", {"matcher": "random:0"}, tmp_path / "m")
    assert vals["Output"] == "random:0"
    vals, _ = run_component(spec, "vokens-tokenize-plan", {
        "corpus": s.corpus, "tokenizer": s.tokenizer, "retrieval_input": "", "drop_empty": False, "block_lines": 8,
        "out": str(out), "num_shards": 2, "split": "balanced"}, tmp_path / "tp")
    done = [V.tokenize(t) for t in vals["Output"]]
    vals, _ = run_component(spec, "vokens-tokenize-merge", {"shards": done, "out": str(out), "corpus": s.corpus,
                                                             "tokenizer": s.tokenizer}, tmp_path / "tm")
    tokens = vals["Output"]
    assert tokens["entries"] == 36 and tokens["empty_lines"] == 3
    vals, _ = run_component(spec, "vokens-keys-plan", {
        "images": s.images, "image_set": "coco_sample", "image_root": s.image_root, "matcher": "random:0",
        "config": "tiny", "batch_size": 2, "out": str(out), "num_shards": 2, "split": "balanced"}, tmp_path / "kp")
    first, rest = vals["Output"][0], vals["Output"][1:]
    v, _ = run_component(spec, "vokens-keys", {"spec": first, "device": "cpu", "num_workers": 0}, tmp_path / "k0")
    done = [v["Output"]] + [V.keys(k, CPU) for k in rest]
    assert sum(d["images"] for d in done) == 6
    vals, _ = run_component(spec, "vokens-keys-merge", {"shards": done, "out": str(out), "image_set": "coco_sample"},
                            tmp_path / "km")
    vals, _ = run_component(spec, "vokens-plan", {
        "tokens": tokens, "keys": vals["Output"], "matcher": "random:0", "config": "tiny", "topk": 5, "max_images": -1,
        "page_lines": 8, "out": str(out), "num_shards": 2, "split": "balanced"}, tmp_path / "vp")
    done = [V.vokenize(v, CPU) for v in vals["Output"]]
    vals, arts = run_component(spec, "vokens-merge", {"shards": done, "out": str(out), "tokens": tokens}, tmp_path / "vm")
    assert vals["Output"]["lines"] == 36 and differing(out, one[0]) == []
    assert Path(arts["report"]).read_text() == (out / "vokens" / V.REPORT).read_text()


def test_train_component_and_a_missing_matcher(sample, tmp_path):
    from kfp_harness import load, run_component

    spec, _ = load("vokens")
    captions = str(sample / "vokens" / "mscoco_sample.json")
    vals, _ = run_component(spec, "vokens-train", {
        "out": str(tmp_path), "train_captions": captions, "valid_captions": captions,
        "train_image_root": str(sample / "images"), "config": "tiny", "tokenizer": str(sample / "vokens" / "wordpiece-sample"),
        "bert_weights": "random:1", "resnet_weights": "random:2", "epochs": 1, "batch_size": 4, "lr": 1e-3,
        "margin": 0.5, "grad_clip": 5.0, "max_len": 16, "valid_batch_size": 4, "seed": 9595, "num_workers": 0,
        "reshuffle_each_epoch": False}, tmp_path / "train")
    assert vals["Output"] == str(tmp_path / "matcher" / "BEST.pth") and Path(vals["Output"]).exists()
    with pytest.raises(AssertionError, match="no such file"):
        run_component(spec, "vokens-matcher", {"matcher": str(tmp_path / "nothing.pth")}, tmp_path / "m")


def test_local_pipeline_run_equals_the_stage(one, sample, tmp_path):
    from vlprep_pipelines import engine

    s = sample_settings(sample)
    params = {"corpus": s.corpus, "images": s.images, "image_set": "coco_sample", "image_root": s.image_root,
              "tokenizer": s.tokenizer, "matcher": "random:0", "config": "tiny", "out": str(tmp_path / "local"),
              "key_batch": 2, "block_lines": 8, "page_lines": 8, "tokenize_shards": 2, "key_shards": 2,
              "vokenize_shards": 2, "device": "cpu", "num_workers": 0}
    engine.run_local("vokens", params, tmp_path / "root")
    assert differing(tmp_path / "local", one[0]) == []
    reports = list((tmp_path / "root").rglob("report"))
    assert reports and "Sample lines and their top 5 images" in reports[0].read_text()
