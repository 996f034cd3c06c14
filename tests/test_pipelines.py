"""Pipelines: golden compiled IR, structure (images, resources, GPU, retry, fan-out), local runs."""

from __future__ import annotations

import filecmp
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from kfp_harness import COMPILED, REPO, component_modules
from vlprep_components import config
from vlprep_pipelines import PIPELINES, engine

NAMES = sorted(PIPELINES)


def _strip_version(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "sdkVersion" not in line)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """Every pipeline compiled now, with the default registry and tag, as `make compile` does it."""
    out = tmp_path_factory.mktemp("compiled")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLPREP_IMAGE")}
    subprocess.run([sys.executable, "-m", "vlprep.cli", "compile", "--out", str(out)], env=env, check=True,
                   capture_output=True)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_golden_compiled_yaml_is_current(fresh, name):
    """pipelines/compiled/ is what `make compile` gives: a change to a pipeline shows in review."""
    golden = COMPILED / f"{name}.yaml"
    assert golden.exists(), f"run `make compile` to create {golden}"
    assert _strip_version((fresh / f"{name}.yaml").read_text()) == _strip_version(golden.read_text()), (
        f"{golden} is stale: run `make compile` and commit it")


def _docs(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


@pytest.mark.parametrize("name", NAMES)
def test_ir_parses_as_pipeline_spec(fresh, name):
    docs = _docs(fresh / f"{name}.yaml")
    json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    if len(docs) > 1:
        json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())


def _tasks(dag: dict, components: dict):
    """Every (task name, task, component name) in a DAG and its sub-DAGs."""
    for tname, task in dag.get("tasks", {}).items():
        cname = task["componentRef"]["name"]
        comp = components[cname]
        yield tname, task, cname
        if "dag" in comp:
            yield from _tasks(comp["dag"], components)


@pytest.mark.parametrize("name", NAMES)
def test_structure(fresh, name):
    spec = _docs(fresh / f"{name}.yaml")[0]
    comps, execs = spec["components"], spec["deploymentSpec"]["executors"]
    modules = component_modules()
    leaf = 0
    for tname, task, cname in _tasks(spec["root"]["dag"], comps):
        comp = comps[cname]
        if "dag" in comp:
            continue
        leaf += 1
        name = re.sub(r"-\d+$", "", cname.removeprefix("comp-"))
        declared = config.COMPONENTS[name.replace("-", "_")]
        container = execs[comp["executorLabel"]]["container"]
        assert container["image"] == config.stage_image(modules[name]), tname
        assert "pip install" not in " ".join(container["command"]), f"{tname} installs packages at pod start"
        res = container["resources"]
        assert res["resourceCpuRequest"] == res["resourceCpuLimit"] == declared.cpu, tname
        assert res["resourceMemoryRequest"] == res["resourceMemoryLimit"] == declared.memory, tname
        if "accelerator" in res or declared.gpus:
            acc = res["accelerator"]
            assert acc["resourceType"] == config.GPU_TYPE, f"{tname}: GPU limit without accelerator type"
            assert int(acc["resourceCount"]) == declared.gpus, tname
        assert task["retryPolicy"]["maxRetryCount"] == declared.retries, tname
    assert leaf >= 3


@pytest.mark.parametrize("name", NAMES)
def test_fan_out_has_compile_time_parallelism(fresh, name):
    spec = _docs(fresh / f"{name}.yaml")[0]
    loops = [task for _, task, _ in _tasks(spec["root"]["dag"], spec["components"]) if "parameterIterator" in task]
    assert loops, f"{name} has no ParallelFor"
    for task in loops:
        assert task["iteratorPolicy"]["parallelismLimit"] >= 1


def test_local_captions_run_equals_direct_stage(tmp_path, sample):
    from vlprep.stages import captions

    params = {"karpathy": str(sample / "dataset_coco.json"), "test1k_ids": str(sample / "test1k_ids.txt"),
              "out": str(tmp_path / "local"), "num_shards": 3}
    task = engine.run_local("captions", params, tmp_path / "root")
    del task
    captions.run(str(tmp_path / "direct"), captions.Settings(karpathy=params["karpathy"], test1k_ids=params["test1k_ids"]))
    names = sorted(p.name for p in (tmp_path / "direct").glob("*.jsonl"))
    assert names == ["test1k_ann.jsonl", "test_ann.jsonl", "train_ann.jsonl", "valid_ann.jsonl"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "local", tmp_path / "direct", names, shallow=False)
    assert match == names, (mismatch, errors)
    # three shards ran: three verified markers
    assert len(list((tmp_path / "local" / "_work" / "captions").glob("*.done.json"))) == 3


def test_make_run_equivalent_writes_run_record(tmp_path):
    """The demo as ``make run`` runs it (``default`` weights), with the published files unreachable: it falls
    back to random:0 and says so, stage by stage, in its output and report."""
    offline = {f"VLPREP_WEIGHTS_URL_{m}": f"http://127.0.0.1:9/{m}" for m in ("BUTD", "X152", "CLIP_VIT_B_32")}
    r = subprocess.run([sys.executable, "-m", "vlprep.cli", "run", "demo", "--local", "--run-name", "t",
                        "--runs-dir", str(tmp_path), "--param", "arch=tiny"], capture_output=True, text=True,
                       cwd=REPO, timeout=1200, env={**os.environ, **offline, "VLPREP_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = yaml.safe_load((tmp_path / "t" / "run.json").read_text())
    assert run["pipeline"] == "demo" and run["versions"]["kfp"].startswith("2.17")
    assert run["git_commit"] is None or len(run["git_commit"]) == 40
    assert str(tmp_path / "t" / "mscoco" / "annotations" / "train_ann.jsonl") in run["outputs"]
    report = (tmp_path / "t" / "report.md").read_text()
    for path in run["outputs"]:
        assert path in report, f"{path} not in the run report"
    assert f"Run report: {tmp_path / 't' / 'report.md'}" in r.stdout
    used = run["weights"]
    assert used["xmodal_ctx/_work/context/settings.json"]["fallback"].startswith("http://127.0.0.1:9/CLIP_VIT_B_32")
    assert used["mscoco/_work/regions/settings.json"]["fallback"].startswith("arch tiny")
    assert used["xlxmert/_work/xlxmert/grid8/settings.json"]["fallback"].startswith("arch tiny")
    matcher = [u for where, u in used.items() if where.startswith("vokens/")]
    assert matcher and all(u["matcher"] == "random:0" and not u["fallback"] for u in matcher)  # asked for
    assert all(u["random"] for u in used.values())
    assert report.count("**RANDOM weights in ") == len(used) and r.stdout.count("WARNING: RANDOM weights in") == len(used)


def test_run_with_config_file_and_compile_cli(tmp_path, sample):
    from vlprep.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"karpathy: {sample / 'dataset_coco.json'}\nnum_shards: 2\n")
    assert main(["run", "captions", "--local", "--config", str(cfg), "--run-name", "c", "--runs-dir",
                 str(tmp_path)]) == 0
    run = yaml.safe_load((tmp_path / "c" / "run.json").read_text())
    assert run["params"]["num_shards"] == 2 and run["params"]["out"] == str(tmp_path / "c")
    assert (tmp_path / "c" / "valid_ann.jsonl").exists()
    assert main(["compile", "captions", "--out", str(tmp_path / "ir")]) == 0
    assert _docs(tmp_path / "ir" / "captions.yaml")[0]["pipelineInfo"]["name"] == "captions"
    bad = tmp_path / "bad.yaml"
    bad.write_text("karpathy: [unclosed\n")
    assert main(["run", "captions", "--local", "--config", str(bad)]) == 2


def test_gpu_tasks_tolerate_the_gpu_taint(fresh):
    spec, platform = _docs(fresh / "regions.yaml")
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu = [name for name, e in spec["deploymentSpec"]["executors"].items() if "accelerator" in e["container"]["resources"]]
    assert gpu == ["exec-regions-extract"]
    assert execs["exec-regions-extract"]["tolerations"] == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]


def test_xlxmert_gpu_tasks(fresh):
    """Extraction (both kinds), k-means and assignment get a GPU and tolerate the taint; merges do not."""
    spec, platform = _docs(fresh / "xlxmert.yaml")
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu = sorted(n for n, e in spec["deploymentSpec"]["executors"].items() if "accelerator" in e["container"]["resources"])
    assert gpu == ["exec-xlxmert-assign", "exec-xlxmert-extract", "exec-xlxmert-extract-2", "exec-xlxmert-kmeans"]
    assert all(execs[n]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
               for n in gpu)


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts)}


def test_cli_run_and_local_pipeline_run_give_the_same_files(tmp_path, sample):
    """The region workflow from the `vlprep` CLI (one process, one shard) and as the local KFP pipeline
    (three shards): the same files, report.html included, byte for byte except the report's timings."""
    from vlprep.cli import main

    params = {"images": str(sample / "images"), "out": str(tmp_path / "local"), "karpathy": str(sample / "dataset_coco.json"),
              "annotations": str(tmp_path / "local" / "annotations"), "arch": "tiny", "device": "cpu",
              "num_shards": 3, "num_workers": 0}
    engine.run_local("regions", params, tmp_path / "root")
    cli = tmp_path / "cli"
    assert main(["captions", "--karpathy", params["karpathy"], "--dataset", "coco", "--out", str(cli / "annotations")]) == 0
    assert main(["regions", "extract", "--images", params["images"], "--out", str(cli), "--arch", "tiny", "--workers", "0",
                 "--weights", "random:0", "--annotations", str(cli / "annotations")]) == 0
    local, direct = _files(tmp_path / "local"), _files(cli)
    assert sorted(local) == sorted(direct)
    lmdb = "resnet101_faster_rcnn_genome_imgfeats/volta/trainval_feat.lmdb"
    assert {"report.html", "hard_negative.pkl", f"{lmdb}/data.mdb", "annotations/train_ann.jsonl",
            "resnet101_faster_rcnn_genome_imgfeats/train2014_obj36-36.tsv", "lxmert/data/mscoco_imgfeat/val2014_obj36.tsv"} <= set(local)
    differ = [n for n in local if local[n].read_bytes() != direct[n].read_bytes()]
    assert set(differ) <= {"report.html", f"{lmdb}/lock.mdb"}  # paths, timings; LMDB's reader table
    figures = [f.read_text().count("<img src='data:image/png;base64,") for f in (local["report.html"], direct["report.html"])]
    assert figures == [6, 6]


def test_xlxmert_cli_and_local_pipeline_run_give_the_same_files(tmp_path, sample):
    """X-LXMERT from the CLI (extract grid8, extract boxes36, kmeans; one shard each) and as the local KFP
    pipeline (three extraction shards, two assignment shards): the same files, byte for byte, but the
    reports (timings, paths). Batch size 1 (upstream's) in both: batches of same-size images, which differ
    with the shard cut, change features by float rounding only (tests/test_x152.py)."""
    from vlprep.cli import main

    images, local, cli = str(sample / "images"), tmp_path / "local", tmp_path / "cli"
    engine.run_local("xlxmert", {"images": images, "out": str(local), "arch": "tiny", "device": "cpu", "num_shards": 3,
                                 "batch_size": 1, "num_workers": 0, "k": 16, "dim": 0, "assign_shards": 2},
                     tmp_path / "root")
    common = ["--images", images, "--weights", "random:0", "--out", str(cli), "--arch", "tiny", "--device", "cpu",
              "--batch-size", "1", "--workers", "0"]
    assert main(["xlxmert", "extract", "--kind", "grid8", *common]) == 0
    assert main(["xlxmert", "extract", "--kind", "boxes36", *common]) == 0
    assert main(["xlxmert", "kmeans", "--out", str(cli), "--n-centroids", "16", "--dim", "0", "--device", "cpu"]) == 0
    got, want = _files(local), _files(cli)
    assert sorted(got) == sorted(want)
    assert {"COCO/features/maskrcnn_train_grid8.h5", "COCO/features/maskrcnn_valid_boxes36.h5",
            "clustering/maskrcnn_mscoco_train_centroids16_iter20_d32_grid8.npy",
            "clustering/maskrcnn_mscoco_train_mscoco_valid_img_id_to_cluster_id_16_iter20_d32_grid8.pkl",
            "xlxmert_grid8_report.html", "xlxmert_boxes36_report.html", "xlxmert_clusters_report.html"} <= set(got)
    differ = [n for n in got if got[n].read_bytes() != want[n].read_bytes()]
    assert all(n.endswith("_report.html") for n in differ), differ


def _leaves(task: dict, comps: dict) -> set[str]:
    comp = comps[task["componentRef"]["name"]]
    if "dag" not in comp:
        return {re.sub(r"-\d+$", "", task["componentRef"]["name"].removeprefix("comp-")).replace("-", "_")}
    return set().union(*(_leaves(t, comps) for t in comp["dag"]["tasks"].values()))


def _after(dag: dict, comps: dict, before: frozenset = frozenset()):
    """(component, the components it runs after) for every leaf task of a compiled DAG."""
    for task in dag["tasks"].values():
        deps = before.union(*(_leaves(dag["tasks"][d], comps) for d in task.get("dependentTasks", [])))
        comp = comps[task["componentRef"]["name"]]
        if "dag" in comp:
            yield from _after(comp["dag"], comps, frozenset(deps))
        else:
            yield next(iter(_leaves(task, comps))), deps


@pytest.mark.parametrize("stage_name", ["captions", "regions", "context", "xlxmert"])
def test_local_driver_runs_the_pipelines_steps_in_its_order(fresh, stage_name):
    """`vlprep <workflow>` and the tests run stage.steps(...) in one process: the same functions as the
    pipeline's components (component name = <stage>_<function>), in an order the pipeline allows."""
    import importlib

    from vlprep import stage

    module = importlib.import_module(f"vlprep.stages.{stage_name}")
    steps = module.steps("unused", None)
    names = [f"{stage_name}_{s.name}" for s in steps]
    assert all(callable(getattr(module, s.name)) for s in steps)
    assert all(not s.over or s.over in [t.name for t in steps[:i]] for i, s in enumerate(steps))
    assert all(isinstance(s, stage.Step) for s in steps)
    spec = _docs(fresh / f"{stage_name}.yaml")[0]
    order = {c: deps for c, deps in _after(spec["root"]["dag"], spec["components"]) if c.startswith(stage_name + "_")}
    assert sorted(order) == sorted(names)
    for name, deps in order.items():
        assert all(names.index(d) < names.index(name) for d in deps if d in names), (name, deps)


def test_vokens_steps_follow_the_pipeline_and_training_is_a_condition(fresh):
    """`vokens` trains only without a matcher (dsl.If / dsl.Else): the local driver's first step is the branch
    the pipeline takes, and its steps are the pipeline's components in an order the DAG allows."""
    from vlprep.stages import vokens

    spec, platform = _docs(fresh / "vokens.yaml")
    order = {c: deps for c, deps in _after(spec["root"]["dag"], spec["components"]) if c.startswith("vokens_")}
    seen = set()
    for matcher, first in (("", "vokens_train"), ("random:0", "vokens_matcher")):
        steps = vokens.steps("unused", vokens.Settings(corpus="c.txt", images="i", image_set="s", tokenizer="t",
                                                       matcher=matcher))
        names = [f"vokens_{s.name}" for s in steps]
        assert names[0] == first and all(callable(getattr(vokens, s.name)) for s in steps)
        assert all(not s.over or s.over in [t.name for t in steps[:i]] for i, s in enumerate(steps))
        for name in names:
            assert all(names.index(d) < names.index(name) for d in order[name] if d in names), name
        seen |= set(names)
    assert sorted(order) == sorted(seen)
    branches = [t for _, t, _ in _tasks(spec["root"]["dag"], spec["components"]) if "triggerPolicy" in t]
    assert sorted(t["triggerPolicy"]["condition"] for t in branches) == [
        "!(inputs.parameter_values['pipelinechannel--matcher'] == '')",
        "inputs.parameter_values['pipelinechannel--matcher'] == ''"]
    gpus = {name: int(e["container"]["resources"]["accelerator"]["resourceCount"])
            for name, e in spec["deploymentSpec"]["executors"].items() if "accelerator" in e["container"]["resources"]}
    assert gpus == {"exec-vokens-train": config.COMPONENTS["vokens_train"].gpus, "exec-vokens-keys": 1,
                    "exec-vokens-vokenize": 1}
    tolerations = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(tolerations[name]["tolerations"][0]["key"] == config.GPU_TYPE for name in gpus)
