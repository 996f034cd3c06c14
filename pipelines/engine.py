"""The two engines for the same pipeline functions: kfp.local (embedded default) and a KFP cluster.

No second DAG: ``run_local`` calls the very pipeline function a cluster runs, through
``kfp.local.SubprocessRunner(use_venv=False)``, so components run in this interpreter (where vlprep
is installed) instead of in their images.
"""

from __future__ import annotations

import builtins
import os
import tempfile
import warnings
from pathlib import Path

from vlprep import VlprepError


def pipelines() -> dict:
    from vlprep_pipelines import PIPELINES

    return PIPELINES


# earlier names of two workflows, still accepted by `vlprep run / compile / submit`
ALIASES = {"region_features": "regions", "crossmodal_context": "context"}


def canonical(name: str) -> str:
    """The pipeline's name (its workflow's name everywhere: CLI, stage, components, pipeline)."""
    return ALIASES.get(name, name)


def get(name: str):
    found = pipelines()
    name = canonical(name)
    if name not in found:
        raise VlprepError(f"unknown pipeline {name!r}; available: {', '.join(sorted(found))}")
    return found[name]


def compile_pipeline(name: str, path: str | Path) -> Path:
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(get(name), str(path))
    return path


def run_local(name: str, params: dict, pipeline_root: str | Path):
    """Run a pipeline on this machine; returns the kfp.local pipeline task (``.outputs``)."""
    from kfp import local

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    original_print = builtins.print  # kfp.local indents print() per task; parallel tasks can leave it patched
    with warnings.catch_warnings():
        # our images are not named "python"; locally the components run in this interpreter anyway
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        # resources and GPU settings are for the cluster; locally they are ignored by design
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            return get(name)(**params)
        finally:
            builtins.print = original_print


def submit(name: str, host: str, params: dict, experiment: str = "vlprep", run_name: str | None = None,
           token: str | None = None, pipeline_root: str | None = None, enable_caching: bool | None = None) -> str:
    """Compile and start a run on a KFP cluster through its REST API; returns the run id."""
    import kfp

    client = kfp.Client(host=host, existing_token=token or os.environ.get("KFP_TOKEN") or None)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(name, Path(tmp, f"{name}.yaml"))
        run = client.create_run_from_pipeline_package(
            str(package),
            arguments=params,
            run_name=run_name,
            experiment_name=experiment,
            pipeline_root=pipeline_root,
            enable_caching=enable_caching,
        )
    return run.run_id
