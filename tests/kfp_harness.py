"""Run a compiled component the way a KFP pod would: its command and args, a real executor input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "pipelines" / "compiled"


def load(pipeline: str) -> tuple[dict, dict]:
    """(pipeline spec, platform spec or {}) of a compiled pipeline YAML."""
    docs = list(yaml.safe_load_all((COMPILED / f"{pipeline}.yaml").read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def run_component(spec: dict, component: str, params: dict, workdir: Path) -> tuple[dict, dict]:
    """Execute ``comp-<component>`` from a compiled pipeline spec in a subprocess.

    Returns (parameter outputs, {artifact output name: local path}).
    """
    comp = spec["components"][f"comp-{component}"]
    container = spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]
    workdir.mkdir(parents=True, exist_ok=True)
    outputs = comp.get("outputDefinitions", {})
    out_params = {n: {"outputFile": str(workdir / f"param-{n}")} for n in outputs.get("parameters", {})}
    out_artifacts = {}
    for n, d in outputs.get("artifacts", {}).items():
        out_artifacts[n] = {"artifacts": [{"name": n, "type": d["artifactType"], "uri": str(workdir / "artifacts" / n),
                                           "metadata": {}}]}
    (workdir / "artifacts").mkdir(exist_ok=True)
    executor_input = {
        "inputs": {"parameterValues": params},
        "outputs": {"parameters": out_params, "artifacts": out_artifacts,
                    "outputFile": str(workdir / "executor_output.json")},
    }
    argv = [a.replace("{{$}}", json.dumps(executor_input)) for a in container["command"] + container["args"]]
    # In the image, `python3` is the interpreter with vlprep installed: here, this one.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"component {component} failed:\n{r.stdout}\n{r.stderr}")
    doc = json.loads((workdir / "executor_output.json").read_text())
    values = doc.get("parameterValues", {})
    return values, {n: str(workdir / "artifacts" / n) for n in out_artifacts}
