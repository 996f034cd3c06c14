"""Per-component tests: each component's compiled command run in a subprocess with a KFP executor input."""

from __future__ import annotations

import json
from pathlib import Path

from chains import Chain, regions_chain, xlxmert_chain
from kfp_harness import load, run_component


def test_caption_components_chain(tmp_path, sample):
    spec, _ = load("captions")
    out = tmp_path / "store"
    karpathy, ids = str(sample / "dataset_coco.json"), str(sample / "test1k_ids.txt")
    vals, _ = run_component(spec, "captions-plan",
                            {"karpathy": karpathy, "dataset": "coco", "test1k_ids": ids, "out": str(out), "num_shards": 3,
                             "split": "balanced"}, tmp_path / "plan")
    shards = vals["Output"]
    assert [s["index"] for s in shards] == [0, 1, 2] and all(s["count"] == 3 for s in shards)
    done = []
    for s in shards:
        vals, _ = run_component(spec, "captions-extract", {"spec": s}, tmp_path / f"extract{s['index']}")
        done.append(vals["Output"])
        assert vals["Output"]["skipped"] is False and vals["Output"]["failed"] == []
    assert sum(d["items"] for d in done) == 6
    # a retried pod finds its shard done and skips it
    vals, _ = run_component(spec, "captions-extract", {"spec": shards[0]}, tmp_path / "again")
    assert vals["Output"]["skipped"] is True
    vals, arts = run_component(spec, "captions-merge", {"shards": done, "out": str(out)}, tmp_path / "merge")
    assert vals["Output"]["files"]["train_ann.jsonl"] == 3
    assert "| train_ann.jsonl | 3 |" in Path(arts["report"]).read_text()
    assert (out / "test1k_ann.jsonl").read_text().count("\n") == 2


def test_component_failure_is_a_failed_pod(tmp_path):
    spec, _ = load("captions")
    try:
        run_component(spec, "captions-plan",
                      {"karpathy": str(tmp_path / "missing.json"), "dataset": "coco", "test1k_ids": "", "out": str(tmp_path),
                       "num_shards": 1, "split": "balanced"},
                      tmp_path / "plan")
    except AssertionError as e:
        assert "missing.json: no such file" in str(e)
    else:
        raise AssertionError("a plan over a missing file succeeded")


def test_region_components_chain(tmp_path, sample):
    c = Chain("regions", tmp_path)
    regions_chain(c, sample)
    out = c.store
    assert c.last("captions-merge").values["Output"]["files"]["train_ann.jsonl"] == 3
    assert json.loads((out / "_work" / "regions" / "plan.json").read_text())["bounds"] == [[0, 3], [3, 6]]
    assert sum(d["images"] for d in c.outputs("regions-extract")) == 6
    merge = c.last("regions-merge")
    assert merge.values["Output"]["images"] == 6 and merge.values["Output"]["random_weights"] is True
    html = Path(merge.artifacts["report"]).read_text()
    assert "RANDOM weights" in html and html.count("<img src='data:image/png;base64,") == 6
    assert (out / "report.html").read_text() == html  # the same report beside the outputs as in the KFP UI
    metrics = json.loads((merge.workdir / "executor_output.json").read_text())["artifacts"]["metrics"]
    assert metrics["artifacts"][0]["metadata"]["images"] == 6
    lmdb = out / "resnet101_faster_rcnn_genome_imgfeats" / "volta" / "trainval_feat.lmdb"  # VOLTA's configs
    assert c.last("regions-lmdb").values["Output"]["lmdb"] == {str(lmdb): 6}
    negatives = c.last("regions-hard-negatives").values["Output"]
    assert negatives["hard_negatives"] == str(out / "hard_negative.pkl") and negatives["train_images"] == 3


def test_xlxmert_components_chain(tmp_path, sample):
    c = Chain("xlxmert", tmp_path)
    xlxmert_chain(c, sample)
    out = c.store
    assert [s["kind"] for s in c.outputs("xlxmert-plan")[0]] == ["grid8", "grid8"]
    grid, boxes = c.outputs("xlxmert-merge")
    extracted = c.outputs("xlxmert-extract")
    assert sum(d["images"] for d in extracted[:2]) == 6 and not any(d["skipped"] for d in extracted)
    assert grid["names"] == {"mscoco_train": str(out / "COCO/features/maskrcnn_train_grid8.h5"),
                             "mscoco_valid": str(out / "COCO/features/maskrcnn_valid_grid8.h5")}
    merge = [s for s in c.steps if s.component == "xlxmert-merge"][0]
    assert Path(merge.artifacts["report"]).read_text() == (out / "xlxmert_grid8_report.html").read_text()
    metrics = json.loads((merge.workdir / "executor_output.json").read_text())["artifacts"]["metrics"]
    assert metrics["artifacts"][0]["metadata"]["images"] == 6
    trained = c.last("xlxmert-kmeans").values["Output"]
    assert trained["vocabulary"]["dim"] == 32 and trained["skipped"] is False and trained["gpu"] is False
    assert Path(trained["centroids"]).name == "maskrcnn_mscoco_train_centroids8_iter20_d32_grid8.npy"
    assert [a["targets"] for a in c.outputs("xlxmert-assign")] == [{"mscoco_train": 3}, {"mscoco_valid": 3}]
    assigned = c.last("xlxmert-assign-merge")
    assert assigned.values["Output"]["targets"]["mscoco_valid"] == {"images": 3, "cells": 192}
    assert assigned.values["Output"]["skipped_shards"] == 0
    assert "X-LXMERT visual vocabulary" in Path(assigned.artifacts["report"]).read_text()
    assert boxes["images"] == 6 and set(boxes["names"]) == {"mscoco_train", "mscoco_valid"}
