"""A quiet `vlprep run`: one line per task on the terminal, kfp.local's output in the run's log file, and the end
of a failed task's output shown with the log's path."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from vlprep_pipelines.run_log import TaskLog

REPO = Path(__file__).resolve().parents[1]
TASK_LINE = re.compile(r"^  (\S+)\s+(ok|cached|FAILED)\s+(\d+\.\d) s$")


def vlprep_run(tmp_path: Path, karpathy: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlprep.cli", "run", "captions", "--local", "--run-name", "r",
                           "--runs-dir", str(tmp_path), "--param", f"karpathy={karpathy}", "--param", "num_shards=3",
                           *extra], capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**os.environ, **(env or {})})


def task_lines(stdout: str) -> list[tuple[str, str]]:
    return [m.groups()[:2] for m in map(TASK_LINE.match, stdout.splitlines()) if m]


def test_success_prints_one_line_per_task_and_logs_the_executor_output(tmp_path, sample):
    r = vlprep_run(tmp_path, str(sample / "dataset_coco.json"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert task_lines(r.stdout) == [("captions-plan", "ok")] + [("captions-extract", "ok")] * 3 + \
        [("captions-merge", "ok")]
    assert "KFP Executor" not in r.stdout + r.stderr and "Executing task" not in r.stdout + r.stderr
    assert len(r.stdout.splitlines()) < 20, r.stdout
    log = tmp_path / "r" / "logs" / "run.log"
    text = log.read_text()
    assert re.search(r"^\[captions-plan\] .*Executing task 'captions-plan'", text, re.M)
    assert re.search(r"^\[captions-merge\] .*KFP Executor .*Wrote executor output file", text, re.M)
    assert text.count("Executing task 'captions-extract'") == 3 and "\x1b[" not in text
    for wanted in (str(log), str(tmp_path / "r" / "report.md"), str(tmp_path / "r" / "run.json")):
        assert wanted in r.stdout
    assert "logs/run.log" not in (tmp_path / "r" / "report.md").read_text()  # the log is not an output

    # the same run again: each shard's verified marker is found, its task says so
    again = vlprep_run(tmp_path, str(sample / "dataset_coco.json"))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert task_lines(again.stdout) == [("captions-plan", "ok")] + [("captions-extract", "cached")] * 3 + \
        [("captions-merge", "ok")]


def test_verbose_keeps_the_whole_output(tmp_path, sample):
    r = vlprep_run(tmp_path, str(sample / "dataset_coco.json"), env={"VLPREP_VERBOSE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Executing task" in r.stdout and "KFP Executor" in r.stdout and not task_lines(r.stdout)
    assert not (tmp_path / "r" / "logs").exists()


@pytest.mark.slow  # kfp.local retries the failed task twice, 30 s then 60 s later, as a cluster would
def test_failed_task_shows_the_end_of_its_output_and_the_log(tmp_path):
    bad = tmp_path / "karpathy.json"
    bad.write_text('{"images": 3}')
    r = vlprep_run(tmp_path, str(bad))
    assert r.returncode != 0
    assert task_lines(r.stdout) == [("captions-plan", "FAILED")] * 3
    assert "captions-plan" in r.stdout and "retry 2/3 in 30 s" in r.stdout
    log = tmp_path / "r" / "logs" / "run.log"
    assert f"whole log: {log}" in r.stderr
    tail = r.stderr.split("--- last ", 1)[1].splitlines()
    assert tail[0].startswith("40 lines of task 'captions-plan'")
    assert any("missing key 'images'" in line for line in tail[1:41])  # the task's own error
    assert "Inner task failed: 'captions-plan'" in r.stderr
    assert "missing key 'images'" in log.read_text()


def test_task_log_attributes_each_threads_lines_to_its_task():
    log, terminal = io.StringIO(), io.StringIO()
    task_log = TaskLog(log, terminal, clock=lambda: 0.0)
    ready = threading.Barrier(2)

    def task(name: str, output: str, status: str):
        task_log.write(f"12:00:00.000 - INFO - Executing task \x1b[96m'{name}'\x1b[0m\n")
        ready.wait()
        for ch in output:  # a line arrives in pieces, interleaved with the other thread's
            task_log.write(ch)
        task_log.write(f"\n12:00:01.000 - INFO - Task '{name}' finished with status {status}\n")
        task_log.write(f"Task '{name}' outputs:\n    Output: {{'skipped': {name == 'b'}}}\n" + "-" * 40 + "\n")

    threads = [threading.Thread(target=task, args=args) for args in
               (("a", "output of a", "SUCCESS"), ("b", "output of b", "SUCCESS"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = log.getvalue().splitlines()
    assert "[a] output of a" in lines and "[b] output of b" in lines
    assert sorted(terminal.getvalue().split()) == sorted(["a", "ok", "0.0", "s", "b", "cached", "0.0", "s"])
