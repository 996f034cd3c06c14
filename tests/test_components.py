"""Per-component tests: each component's compiled command run in a subprocess with a KFP executor input."""

from __future__ import annotations

from pathlib import Path

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
    import json

    spec, _ = load("regions")
    out = tmp_path / "store"
    settings = {"images": str(sample / "images"), "image_root": "", "dataset": "coco", "recipe": "caffe36",
                "recipe_params": {}, "weights": "random:0", "arch": "tiny", "autocast": "",
                "formats": "volta-tsv,lxmert-tsv", "lmdb": True, "annotations": "", "vocab_objects": "",
                "vocab_attributes": ""}
    vals, _ = run_component(spec, "regions-plan", {**settings, "out": str(out), "num_shards": 3, "split": "group"},
                            tmp_path / "plan")
    assert json.loads((out / "_work" / "regions" / "plan.json").read_text())["bounds"] == [[0, 2], [2, 4], [4, 6]]
    done = []
    for s in vals["Output"]:
        vals, _ = run_component(spec, "regions-extract", {"spec": s, "device": "cpu", "batch_size": 4, "num_workers": 0},
                                tmp_path / f"x{s['index']}")
        done.append(vals["Output"])
    assert sum(d["images"] for d in done) == 6
    vals, arts = run_component(spec, "regions-merge", {"shards": done, "out": str(out)}, tmp_path / "merge")
    assert vals["Output"]["images"] == 6 and vals["Output"]["random_weights"] is True
    html = Path(arts["report"]).read_text()
    assert "RANDOM weights" in html and html.count("<img src='data:image/png;base64,") == 6
    assert (out / "report.html").read_text() == html  # the same report beside the outputs as in the KFP UI
    metrics = json.loads((tmp_path / "merge" / "executor_output.json").read_text())["artifacts"]["metrics"]
    assert metrics["artifacts"][0]["metadata"]["images"] == 6
    vals, _ = run_component(spec, "regions-lmdb", {"merged": vals["Output"], "out": str(out)}, tmp_path / "lmdb")
    assert vals["Output"]["lmdb"] == {str(out / "trainval_feat.lmdb"): 6}


def test_xlxmert_components_chain(tmp_path, sample):
    import json

    spec, _ = load("xlxmert")
    out = tmp_path / "store"
    settings = {"images": str(sample / "images"), "image_root": "", "dataset": "coco", "kind": "grid8",
                "weights": "random:0", "config": "", "arch": "tiny", "autocast": "", "imsize": 0}
    vals, _ = run_component(spec, "xlxmert-plan", {**settings, "out": str(out), "num_shards": 2, "split": "balanced"},
                            tmp_path / "plan")
    specs = vals["Output"]
    assert [s["kind"] for s in specs] == ["grid8", "grid8"]
    done = []
    for s in specs:
        vals, _ = run_component(spec, "xlxmert-extract", {"spec": s, "device": "cpu", "batch_size": 2, "num_workers": 0},
                                tmp_path / f"x{s['index']}")
        done.append(vals["Output"])
    assert sum(d["images"] for d in done) == 6 and not any(d["skipped"] for d in done)
    vals, arts = run_component(spec, "xlxmert-merge", {"shards": done, "out": str(out), "kind": "grid8"}, tmp_path / "m")
    merged = vals["Output"]
    assert merged["names"] == {"mscoco_train": str(out / "COCO/features/maskrcnn_train_grid8.h5"),
                               "mscoco_valid": str(out / "COCO/features/maskrcnn_valid_grid8.h5")}
    assert Path(arts["report"]).read_text() == (out / "xlxmert_grid8_report.html").read_text()
    metrics = json.loads((tmp_path / "m" / "executor_output.json").read_text())["artifacts"]["metrics"]
    assert metrics["artifacts"][0]["metadata"]["images"] == 6
    vocab = {"features": [], "src": "", "k": 8, "niter": 20, "dim": 0, "seed": 1234, "max_points_per_centroid": 256,
             "nredo": 1, "imsize": 0, "images": "", "device": "cpu"}
    vals, _ = run_component(spec, "xlxmert-kmeans", {"merged": merged, "out": str(out), **vocab}, tmp_path / "k")
    trained = vals["Output"]
    assert trained["vocabulary"]["dim"] == 32 and trained["skipped"] is False and trained["gpu"] is False
    assert Path(trained["centroids"]).name == "maskrcnn_mscoco_train_centroids8_iter20_d32_grid8.npy"
    vals, _ = run_component(spec, "xlxmert-assign-plan", {"trained": trained, "out": str(out), "num_shards": 2,
                                                          "split": "balanced"}, tmp_path / "ap")
    assigned = [run_component(spec, "xlxmert-assign", {"spec": s, "device": "cpu"}, tmp_path / f"a{s['index']}")[0]
                ["Output"] for s in vals["Output"]]
    assert [a["targets"] for a in assigned] == [{"mscoco_train": 3}, {"mscoco_valid": 3}]
    vals, arts = run_component(spec, "xlxmert-assign-merge", {"shards": assigned, "out": str(out)}, tmp_path / "am")
    assert vals["Output"]["targets"]["mscoco_valid"] == {"images": 3, "cells": 192}
    assert vals["Output"]["skipped_shards"] == 0
    assert "X-LXMERT visual vocabulary" in Path(arts["report"]).read_text()
