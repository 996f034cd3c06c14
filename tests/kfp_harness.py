"""Run a compiled component the way a KFP pod would: its command and args, a real executor input.

The container is this interpreter in a subprocess (``run_in_subprocess``, the default) or the
component's own image under Docker (``DockerRun``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "pipelines" / "compiled"

# (image, command, args) -> (exit status, output): the container runtime
Runner = Callable[[str, list, list], tuple]


def load(pipeline: str) -> tuple[dict, dict]:
    """(pipeline spec, platform spec or {}) of a compiled pipeline YAML."""
    docs = list(yaml.safe_load_all((COMPILED / f"{pipeline}.yaml").read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def component_modules() -> dict[str, str]:
    """{KFP component name (``captions-plan``): the components module that defines it}."""
    import importlib
    import pkgutil

    import vlprep_components
    from kfp.dsl.python_component import PythonComponent

    found = {}
    for info in pkgutil.iter_modules(vlprep_components.__path__):
        module = importlib.import_module(f"vlprep_components.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, PythonComponent) and obj.python_func.__module__ == module.__name__:
                found[obj.name] = module.__name__
    return found


def container_of(spec: dict, component: str) -> dict:
    """The ``container`` entry (image, command, args, resources) of ``comp-<component>``."""
    comp = spec["components"][f"comp-{component}"]
    return spec["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]


def executor_input(spec: dict, component: str, params: dict, workdir: Path) -> dict:
    """The executor input KFP gives ``comp-<component>``: ``params`` in, outputs under ``workdir``."""
    outputs = spec["components"][f"comp-{component}"].get("outputDefinitions", {})
    out_params = {n: {"outputFile": str(workdir / f"param-{n}")} for n in outputs.get("parameters", {})}
    out_artifacts = {}
    for n, d in outputs.get("artifacts", {}).items():
        out_artifacts[n] = {"artifacts": [{"name": n, "type": d["artifactType"], "uri": str(workdir / "artifacts" / n),
                                           "metadata": {}}]}
    return {
        "inputs": {"parameterValues": params},
        "outputs": {"parameters": out_params, "artifacts": out_artifacts,
                    "outputFile": str(workdir / "executor_output.json")},
    }


def run_in_subprocess(image: str, command: list, args: list) -> tuple[int, str]:
    """The container is this interpreter: in the image, `python3` is the one with vlprep installed."""
    del image
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(command + args, env=env, capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout + r.stderr


def run_component(spec: dict, component: str, params: dict, workdir: Path,
                  runner: Runner = run_in_subprocess) -> tuple[dict, dict]:
    """Execute ``comp-<component>`` from a compiled pipeline spec as its pod would.

    Returns (parameter outputs, {artifact output name: local path}).
    """
    container = container_of(spec, component)
    (workdir / "artifacts").mkdir(parents=True, exist_ok=True)
    doc = json.dumps(executor_input(spec, component, params, workdir))
    code, output = runner(container["image"], container["command"], [a.replace("{{$}}", doc) for a in container["args"]])
    if code != 0:
        raise AssertionError(f"component {component} failed:\n{output}")
    values = json.loads((workdir / "executor_output.json").read_text()).get("parameterValues", {})
    artifacts = spec["components"][f"comp-{component}"].get("outputDefinitions", {}).get("artifacts", {})
    return values, {n: str(workdir / "artifacts" / n) for n in artifacts}


class DockerRun:
    """The container is the component's image, run as a pod runs it: the compiled command as the
    entrypoint, the args as the command, the image's own (non-root) user.

    ``writable`` and ``readonly`` host folders are mounted at the same paths; the writable ones are
    opened to the image's user first (a pod writes its outputs as that user).
    """

    def __init__(self, writable: Sequence[Path], readonly: Sequence[Path] = (), env: dict | None = None,
                 network_mode: str = "bridge"):
        import docker

        self.client = docker.from_env()
        self.writable, self.readonly = [Path(p) for p in writable], [Path(p) for p in readonly]
        self.env, self.network_mode = dict(env or {}), network_mode

    def __call__(self, image: str, command: list, args: list) -> tuple[int, str]:
        for root in self.writable:
            open_to_all(root)
        volumes = {str(p): {"bind": str(p), "mode": "rw"} for p in self.writable}
        volumes.update({str(p): {"bind": str(p), "mode": "ro"} for p in self.readonly})
        container = self.client.containers.run(image, entrypoint=command, command=args, volumes=volumes,
                                               environment=self.env, network_mode=self.network_mode, detach=True)
        try:
            code = container.wait(timeout=900)["StatusCode"]
            return code, container.logs().decode("utf-8", "replace")
        finally:
            container.remove(force=True)


def open_to_all(root: Path) -> None:
    """Let any user read and write ``root`` and everything in it (a bind mount keeps host owners)."""
    root.mkdir(parents=True, exist_ok=True)
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o777)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666)
