"""``--devices``: parsing, the worker pool, and a regions run on two processes equal to one."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import re

import pytest
import torch

from vlprep import VlprepError, devices, stage


def test_parse_forms():
    assert [d.name for d in devices.parse("auto", cpu_cores=4, gpus=0).devices] == ["cpu"]
    two = devices.parse("auto", cpu_cores=16, gpus=2)
    assert [(d.name, d.threads) for d in two.devices] == [("cuda:0", 8), ("cuda:1", 8)]
    assert devices.parse("cuda:0,1", cpu_cores=16, gpus=2) == two == devices.parse("cuda:0,cuda:1", cpu_cores=16, gpus=2)
    assert devices.parse("cuda", cpu_cores=16, gpus=2) == two
    assert two.runtime_device == "cuda"
    assert devices.parse("cuda:1", cpu_cores=16, gpus=2).runtime_device == "cuda:1"  # one device: in this process
    three = devices.parse("cpu:3", cpu_cores=8)
    assert [(d.label, d.threads) for d in three.devices] == [("cpu worker 1", 2), ("cpu worker 2", 2),
                                                            ("cpu worker 3", 2)]
    assert three.runtime_device == "cpu"
    assert devices.parse("cpu", cpu_cores=8).devices == (devices.Device("cpu", 8, 0),)


@pytest.mark.parametrize(("text", "says"), [
    ("tpu", "unknown form"),
    ("cuda:2", "no GPU cuda:2 (torch sees 2"),
    ("cuda:0,0", "cuda:0 is named twice"),
    ("cuda:0,x", "'x' is not a GPU index"),
    ("cpu:0", "whole number >= 1"),
    ("cpu:two", "whole number >= 1"),
    ("cpu:5", "5 processes on 4 cores would oversubscribe"),
])
def test_parse_refuses(text, says):
    with pytest.raises(VlprepError, match=re.escape(says)):
        devices.parse(text, cpu_cores=4, gpus=2)


def test_cuda_without_gpus_refuses():
    with pytest.raises(VlprepError, match="no CUDA GPU visible"):
        devices.parse("cuda:0", cpu_cores=4, gpus=0)


def test_worker_environment_maps_torch_index_to_visible_gpu(monkeypatch):
    gpu = devices.parse("cuda:0,1", cpu_cores=6, gpus=2).devices[1]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu.environment() == {"CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # torch's cuda:1 is the machine's GPU 6
    assert gpu.environment()["CUDA_VISIBLE_DEVICES"] == "6"
    assert devices.Device("cpu", 1).environment()["CUDA_VISIBLE_DEVICES"] == ""  # CPU workers see no GPU


def test_fewer_shards_than_devices_are_raised():
    two = devices.parse("cpu:2", cpu_cores=2)
    assert two.shards(1) == 2
    assert two.shards(5) == 5


def test_every_fanned_out_step_can_be_sent_to_a_worker():
    """Workers receive a step's call by pickle: each stage's fan-outs are module functions bound to their
    runtime with functools.partial (a lambda would be refused)."""
    from vlprep import stage
    from vlprep.stages import captions, regions

    runtime = stage.Runtime(device="cpu", batch_size=3)
    steps = [*regions.steps("out", regions.Settings(images="x"), runtime=runtime),
             *captions.steps("out", captions.Settings(karpathy="k.json"), runtime=runtime)]
    fanned = [s for s in steps if s.over]
    assert len(fanned) == 2
    for step in fanned:
        call = pickle.loads(pickle.dumps(step.call))
        assert call.func is step.call.func and call.keywords == {"runtime": runtime}
    with pytest.raises(VlprepError, match="cannot be sent to a worker"):
        devices.Pool(devices.parse("cpu:2", cpu_cores=2)).map("t", lambda spec: spec, [{"index": 0}])


def _fail_second_shard(spec: dict) -> dict:
    if spec["index"] == 1:
        if spec["how"] == "exit":
            os._exit(3)
        raise ZeroDivisionError("division by zero")
    return {"index": spec["index"], "pid": os.getpid()}


@pytest.mark.parametrize(("how", "says"), ids=["raise", "exit"], argvalues=[
    ("raise", r"boom fan: shard 2/2 on cpu worker \d \(worker pid \d+\) failed: ZeroDivisionError: division by zero"),
    ("exit", r"boom fan: the worker on cpu worker \d \(pid \d+\) died (during shard 2/2|between shards) with exit code 3 .*"),
])
def test_a_failing_shard_raises_one_error_and_stops_the_workers(how, says):
    steps = [stage.Step("plan", lambda: [{"index": 0, "how": how}, {"index": 1, "how": how}]),
             stage.Step("fan", _fail_second_shard, over="plan")]
    with devices.active(devices.parse("cpu:2", cpu_cores=2)), pytest.raises(VlprepError) as caught:
        stage.run_local("boom", steps)
    assert re.fullmatch(says, str(caught.value))
    assert multiprocessing.active_children() == []


def _regions(out, device_text: str) -> list[str]:
    from vlprep.cli import main

    sample = os.path.join(os.path.dirname(devices.__file__), "sample", "images")
    return main(["regions", "extract", "--images", sample, "--out", str(out), "--arch", "tiny", "--weights", "random:0",
                 "--workers", "0", "--shards", "2", "--devices", device_text])


def _files(out) -> dict[str, object]:
    """Every file under ``out`` but the report, the LMDB lock and the holder record (the run's id and pid);
    markers without their timings."""
    found = {}
    skip = ("report.html", "lock.mdb", "holder.json")
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name not in skip):
        name = str(path.relative_to(out))
        if name.endswith(".done.json"):
            marker = json.loads(path.read_text())
            found[name] = {k: v for k, v in marker.items() if not k.endswith("seconds")}
        else:
            found[name] = path.read_bytes()
    return found


def test_regions_on_two_processes_equal_one(tmp_path, caplog):
    if devices.cores() < 2:
        pytest.skip("cpu:2 needs two cores")
    with caplog.at_level(logging.INFO, logger="vlprep.devices"):
        assert _regions(tmp_path / "two", "cpu:2") == 0
    pids = set(re.findall(r"regions extract: shard \d/2 on cpu worker \d \(worker pid (\d+)\) done", caplog.text))
    assert len(pids) == 2 and str(os.getpid()) not in pids
    threads = devices.parse("cpu:2").devices[0].threads  # each worker's; float sums depend on the thread count
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert _regions(tmp_path / "one", "cpu:1") == 0  # one device: the shards run in this process
    finally:
        torch.set_num_threads(before)
    two, one = _files(tmp_path / "two"), _files(tmp_path / "one")
    assert any(name.endswith(".tsv") for name in one) and any(name.endswith(".done.json") for name in one)
    assert two.keys() == one.keys()
    for name in one:
        assert two[name] == one[name], name


def test_cli_refuses_a_missing_gpu(tmp_path, capsys):
    assert _regions(tmp_path / "o", "cuda:99") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlprep: error: --devices 'cuda:99': ") and "\n" not in err
