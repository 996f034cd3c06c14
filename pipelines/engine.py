"""The two engines for the same pipeline functions: kfp.local (embedded default) and a KFP cluster
(upload for the UI, submit, follow a run).

No second DAG: ``run_local`` calls the very pipeline function a cluster runs, through
``kfp.local.SubprocessRunner(use_venv=False)``, so components run in this interpreter (where vlprep
is installed) instead of in their images.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
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


# --------------------------------------------------------------------------- a KFP cluster (REST API)

FINISHED = ("SUCCEEDED", "SKIPPED", "FAILED", "CANCELED")


@contextlib.contextmanager
def _api_errors(host: str) -> Iterator[None]:
    """The KFP API's failures (refusals, an unreachable host) as one VlprepError."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except ApiException as e:
        hint = ("check KFP_TOKEN (or the identity CI authenticates as) and its access to the namespace"
                if e.status in (401, 403) else "check --host and the cluster's API server")
        body = str(e.body or "").strip().splitlines()
        raise VlprepError(f"the KFP API at {host} answered {e.status} {e.reason}"
                          f"{': ' + body[0][:200] if body else ''}; {hint}") from None
    except urllib3.exceptions.HTTPError as e:
        raise VlprepError(f"the KFP API at {host} is unreachable ({type(e).__name__}); check --host") from None
    except TimeoutError as e:  # kfp.Client's health check, tried 5 times
        raise VlprepError(f"the KFP API at {host} does not answer ({e}); check --host") from None


def _client(host: str, token: str | None):
    import kfp

    return kfp.Client(host=host, existing_token=token or os.environ.get("KFP_TOKEN") or None)


def run_url(host: str, run_id: str) -> str:
    """Where a person follows the run in the Kubeflow Pipelines UI."""
    return f"{host.rstrip('/')}/#/runs/details/{run_id}"


def pipeline_url(host: str, pipeline_id: str, version_id: str) -> str:
    return f"{host.rstrip('/')}/#/pipelines/details/{pipeline_id}/version/{version_id}"


def pipeline_info(package: str | Path) -> dict:
    """What the UI shows of a compiled pipeline: its description, and the parameters that have none."""
    import yaml

    with open(package, encoding="utf-8") as f:
        spec = next(yaml.safe_load_all(f))
    parameters = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    return {"description": spec["pipelineInfo"].get("description", ""),
            "undescribed": sorted(p for p, d in parameters.items() if not d.get("description"))}


def _pipeline_id(client, name: str, package: str, description: str) -> str:
    """The id of the pipeline named ``name``, uploading it (with a first version) when there is none."""
    from kfp_server_api.exceptions import ApiException

    try:
        found = client.get_pipeline_id(name)
    except ValueError as e:  # several pipelines of that name
        raise VlprepError(f"{e}; delete all but one in the Kubeflow UI") from None
    if found:
        return found
    try:
        return client.upload_pipeline(package, pipeline_name=name, description=description).pipeline_id
    except ApiException as e:
        if e.status != 409:  # 409: uploaded meanwhile by someone else, as we wanted
            raise
    return client.get_pipeline_id(name)


def _version_id(client, pipeline_id: str, version: str) -> str | None:
    named = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": version}]})
    found = client.list_pipeline_versions(pipeline_id, page_size=1, filter=named).pipeline_versions or []
    return found[0].pipeline_version_id if found else None


def upload(name: str, host: str, version: str, *, token: str | None = None) -> dict:
    """Publish pipeline ``name`` for the UI: the named pipeline (created on first upload) gets version
    ``version``; uploading a version that is already there changes nothing. Returns the ids, whether the
    version is new, and the parameters without a description."""
    from kfp_server_api.exceptions import ApiException

    with _api_errors(host), tempfile.TemporaryDirectory() as tmp:
        client = _client(host, token)
        package = str(compile_pipeline(name, Path(tmp, f"{name}.yaml")))
        info = pipeline_info(package)
        pipeline_id = _pipeline_id(client, name, package, info["description"])
        version_id, created = _version_id(client, pipeline_id, version), False
        if version_id is None:
            try:
                made = client.upload_pipeline_version(package, version, pipeline_id=pipeline_id,
                                                      description=info["description"])
                version_id, created = made.pipeline_version_id, True
            except ApiException as e:
                if e.status != 409:  # 409: the same version uploaded meanwhile
                    raise
                version_id = _version_id(client, pipeline_id, version)
    return {"pipeline_id": pipeline_id, "version_id": version_id, "created": created,
            "undescribed": info["undescribed"]}


def submit(name: str, host: str, params: dict, experiment: str = "vlprep", run_name: str | None = None,
           token: str | None = None, pipeline_root: str | None = None, enable_caching: bool | None = None) -> str:
    """Compile and start a run on a KFP cluster through its REST API; returns the run id."""
    with _api_errors(host), tempfile.TemporaryDirectory() as tmp:
        client = _client(host, token)
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


def wait_for_run(host: str, run_id: str, *, timeout: float, poll: float = 10.0, token: str | None = None,
                 on_state=None) -> tuple[str, str]:
    """Poll the run until it finishes; returns (state, error message). ``on_state(state)`` hears of each
    change. A run still going after ``timeout`` seconds is an error naming where to follow it."""
    give_up = time.monotonic() + timeout
    last = None
    with _api_errors(host):
        client = _client(host, token)
        while True:
            run = client.get_run(run_id)
            state = str(run.state or "RUNTIME_STATE_UNSPECIFIED")
            if state != last and on_state:
                on_state(state)
            last = state
            if state in FINISHED:
                return state, str(getattr(run.error, "message", "") or "")
            if time.monotonic() + poll > give_up:
                raise VlprepError(f"run {run_id} is still {state} after {timeout:g} s; follow it at "
                                  f"{run_url(host, run_id)}")
            time.sleep(poll)
