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
