"""bench/gpu_check.py on the CPU with --quick: every path runs and prints its table line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_gpu_check_runs_every_path_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--device", "cpu", "--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for path in gpu_check.PATHS:
        (line,) = [x for x in lines if x.split()[:1] == [path]]
        if path == "butd-fp16-channels_last":
            assert "CUDA-only" in line
        else:
            rate, seconds = float(line.split()[2]), float(line.split()[4])
            assert rate > 0 and seconds >= 0 and line.split()[1] in ("cpu", "cpu-faiss")
    assert lines[-1].startswith(f"all {len(gpu_check.PATHS)} paths")
