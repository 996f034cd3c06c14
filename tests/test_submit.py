"""`vlprep submit` and `vlprep upload` through kfp.Client against a loopback server that speaks the KFP v2beta1
REST API (pipelines, versions, experiments, runs) and records the calls; plus the CI workflow's shape."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from vlprep.cli import main

REPO = Path(__file__).resolve().parents[1]


class _State:
    """What the fake API server holds: pipelines, versions (with the uploaded IR), runs and their states."""

    def __init__(self):
        self.calls: list = []
        self.tokens: set[str] = set()  # Authorization headers seen
        self.pipelines: dict[str, dict] = {}  # id -> pipeline
        self.versions: dict[str, list[dict]] = {}  # pipeline id -> versions
        self.runs: dict[str, dict] = {}
        self.outcomes: dict[str, list] = {}  # run display name -> states returned by successive polls

    def pipeline_named(self, name):
        return [p for p in self.pipelines.values() if p["display_name"] == name]


def _named(query: dict) -> str | None:
    """The display name an EQUALS filter asks for."""
    if "filter" not in query:
        return None
    (predicate,) = json.loads(query["filter"][0])["predicates"]
    assert predicate["key"] == "display_name" and predicate["operation"] in ("EQUALS", 1)  # kfp.Client sends 1
    return predicate["stringValue"]


class _Api(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    @property
    def state(self) -> _State:
        return self.server.state

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _uploaded_ir(self, body: bytes) -> dict:
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
        (part,) = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "uploadfile"]
        return next(yaml.safe_load_all(part.get_payload(decode=True)))  # the IR (a platform spec may follow)

    def _refused(self) -> bool:
        """A token the server does not take: 401 for everything but the health check."""
        token = self.headers.get("Authorization")
        if token:
            self.state.tokens.add(token)
        return token == "Bearer expired" and not self.path.startswith("/apis/v2beta1/healthz")

    def do_GET(self):
        url = urlparse(self.path)
        query = parse_qs(url.query)
        self.state.calls.append(("GET", url.path, query))
        if self._refused():
            return self._reply({"error": "Unauthorized", "code": 16}, 401)
        if url.path == "/apis/v2beta1/healthz":
            return self._reply({"multi_user": False})
        if url.path == "/apis/v2beta1/experiments":
            return self._reply({"experiments": [], "total_size": 0})
        if url.path == "/apis/v2beta1/pipelines":
            found = self.state.pipeline_named(_named(query))
            return self._reply({"pipelines": found, "total_size": len(found)} if found else {})
        if m := re.fullmatch(r"/apis/v2beta1/pipelines/([^/]+)/versions", url.path):
            found = [v for v in self.state.versions.get(m.group(1), []) if v["display_name"] == _named(query)]
            return self._reply({"pipeline_versions": found, "total_size": len(found)} if found else {})
        if m := re.fullmatch(r"/apis/v2beta1/runs/([^/]+)", url.path):
            run = self.state.runs[m.group(1)]
            states = self.state.outcomes.get(run["display_name"], ["RUNNING"])
            state = states.pop(0) if len(states) > 1 else states[0]
            error = {"code": 9, "message": "task regions-extract failed: exit code 1"} if state == "FAILED" else None
            return self._reply({**run, "state": state, **({"error": error} if error else {})})
        self._reply({"error": f"no route GET {self.path}"}, 404)

    def do_POST(self):
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if url.path.startswith("/apis/v2beta1/pipelines/upload"):
            body = self._uploaded_ir(raw)
        else:
            body = json.loads(raw or b"{}")
        self.state.calls.append(("POST", url.path, {"query": query, "body": body}))
        if self._refused():
            return self._reply({"error": "Unauthorized", "code": 16}, 401)
        if url.path == "/apis/v2beta1/pipelines/upload":
            if self.state.pipeline_named(query["name"]):
                return self._reply({"error": "already exists", "code": 6}, 409)
            pid = f"pipeline-{len(self.state.pipelines) + 1}"
            self.state.pipelines[pid] = {"pipeline_id": pid, "display_name": query["name"],
                                         "description": query.get("description", "")}
            self.state.versions[pid] = [{"pipeline_id": pid, "pipeline_version_id": f"{pid}-v0",
                                         "display_name": query["name"], "pipeline_spec": body}]
            return self._reply(self.state.pipelines[pid])
        if url.path == "/apis/v2beta1/pipelines/upload_version":
            pid, versions = query["pipelineid"], self.state.versions[query["pipelineid"]]
            if any(v["display_name"] == query["name"] for v in versions):
                return self._reply({"error": "already exists", "code": 6}, 409)
            versions.append({"pipeline_id": pid, "pipeline_version_id": f"{pid}-v{len(versions)}",
                             "display_name": query["name"], "description": query.get("description", ""),
                             "pipeline_spec": body})
            return self._reply(versions[-1])
        if url.path == "/apis/v2beta1/experiments":
            return self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        if url.path == "/apis/v2beta1/runs":
            run_id = f"run-{len(self.state.runs) + 1}"
            self.state.runs[run_id] = {"run_id": run_id, "display_name": body.get("display_name"),
                                       "experiment_id": body.get("experiment_id")}
            return self._reply(self.state.runs[run_id])
        self._reply({"error": f"no route POST {self.path}"}, 404)


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv("HOME", "/nonexistent")  # no local kube or kfp config may leak in
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    server.state = _State()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.state
    server.shutdown()
    server.server_close()


def _posts(state: _State, path: str) -> list[dict]:
    return [c for m, p, c in state.calls if m == "POST" and p == path]


# ---------------------------------------------------------------- submit


def test_submit_creates_experiment_and_run(api, capsys):
    host, state = api
    rc = main(["submit", "captions", "--host", host, "--experiment", "nightly", "--run-name", "coco-captions",
               "--param", "karpathy=gs://b/dataset_coco.json", "--param", "out=gs://b/annotations",
               "--param", "num_shards=16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "run run-1" in out and f"{host}/#/runs/details/run-1" in out
    exp = [c["body"] for c in _posts(state, "/apis/v2beta1/experiments")]
    assert exp and exp[0]["display_name"] == "nightly"
    run = _posts(state, "/apis/v2beta1/runs")[0]["body"]
    assert run["display_name"] == "coco-captions" and run["experiment_id"] == "exp-1"
    assert run["pipeline_spec"]["pipelineInfo"]["name"] == "captions"
    assert run["runtime_config"]["parameters"] == {"karpathy": "gs://b/dataset_coco.json",
                                                   "out": "gs://b/annotations", "num_shards": 16}
    assert not [c for c in state.calls if c[1].startswith("/apis/v2beta1/runs/")]  # no --wait: no polling


def test_submit_wait_follows_a_run_to_success(api, capsys):
    host, state = api
    state.outcomes["smoke"] = ["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"]
    rc = main(["submit", "captions", "--host", host, "--run-name", "smoke", "--param", "karpathy=s3://b/k.json",
               "--param", "out=s3://b/o", "--wait", "--poll", "0.01"])
    assert rc == 0
    out = capsys.readouterr().out
    assert [line.split(": ")[1] for line in out.splitlines() if line.startswith("run run-1:")] == \
        ["PENDING", "RUNNING", "SUCCEEDED"]  # each change once
    polls = [c for c in state.calls if c[1] == "/apis/v2beta1/runs/run-1"]
    assert len(polls) == 4


def test_submit_wait_exits_non_zero_when_the_run_fails(api, capsys):
    host, state = api
    state.outcomes["smoke"] = ["RUNNING", "FAILED"]
    rc = main(["submit", "captions", "--host", host, "--run-name", "smoke", "--param", "karpathy=k.json",
               "--param", "out=o", "--wait", "--poll", "0.01"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "run run-1 ended FAILED: task regions-extract failed" in err and f"{host}/#/runs/details/run-1" in err


def test_submit_wait_gives_up_after_the_timeout(api, capsys):
    host, state = api
    state.outcomes["slow"] = ["RUNNING"]
    rc = main(["submit", "captions", "--host", host, "--run-name", "slow", "--param", "karpathy=k.json",
               "--param", "out=o", "--wait", "--poll", "0.05", "--timeout", "0.2"])
    assert rc == 2
    assert "is still RUNNING after 0.2 s; follow it at" in capsys.readouterr().err


def test_submit_on_the_sample_copies_it_to_the_store(api, s3, capsys):
    from vlprep import storage

    host, state = api
    assert main(["submit", "demo", "--host", host, "--sample-store", s3, "--param", "num_shards=1"]) == 0
    params = _posts(state, "/apis/v2beta1/runs")[0]["body"]["runtime_config"]["parameters"]
    assert params["karpathy"] == f"{s3}/sample/dataset_coco.json" and params["mscoco"] == f"{s3}/run/mscoco"
    assert params["num_shards"] == 1  # --param wins
    for key in ("karpathy", "test1k_ids", "attributes", "relationships"):
        assert storage.exists(params[key]), key
    assert len([u for u in storage.list_prefix(params["images"]) if u.endswith(".jpg")]) == 6
    assert not [u for u in storage.list_prefix(s3) if u.endswith(".py")]


def test_submit_unknown_pipeline(api, capsys):
    host, _ = api
    assert main(["submit", "nope", "--host", host]) == 2
    assert "unknown pipeline 'nope'" in capsys.readouterr().err


def test_a_refused_token_is_one_clear_line(api, capsys, monkeypatch):
    host, state = api
    monkeypatch.setenv("KFP_TOKEN", "expired")
    assert main(["submit", "captions", "--host", host, "--param", "karpathy=k", "--param", "out=o"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vlprep: error: the KFP API at {host} answered 401") and "check KFP_TOKEN" in err
    assert err.count("\n") == 1
    assert ("GET", "/apis/v2beta1/healthz", {}) in state.calls and state.tokens == {"Bearer expired"}


# ---------------------------------------------------------------- upload


def test_upload_publishes_a_named_pipeline_with_versions_idempotently(api, capsys):
    host, state = api
    assert main(["upload", "captions", "--host", host, "--version", "abc123"]) == 0
    (pipeline,) = state.pipelines.values()
    assert pipeline["display_name"] == "captions"
    assert pipeline["description"] == "Karpathy split file -> VOLTA caption annotations (jsonl)"
    versions = state.versions[pipeline["pipeline_id"]]
    assert [v["display_name"] for v in versions] == ["captions", "abc123"]  # the first upload makes one itself
    spec = versions[-1]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "captions" and "karpathy" in spec["root"]["inputDefinitions"]["parameters"]
    assert versions[-1]["description"] == pipeline["description"]
    out = capsys.readouterr().out
    assert f"captions: version abc123 uploaded: {host}/#/pipelines/details/pipeline-1/version/pipeline-1-v1" in out

    # the same version again changes nothing; a new one is added to the same pipeline
    assert main(["upload", "captions", "--host", host, "--version", "abc123"]) == 0
    assert "version abc123 was already there" in capsys.readouterr().out
    assert main(["upload", "captions", "--host", host, "--version", "def456"]) == 0
    assert len(state.pipelines) == 1 and [v["display_name"] for v in versions] == ["captions", "abc123", "def456"]
    assert len(_posts(state, "/apis/v2beta1/pipelines/upload")) == 1
    assert len(_posts(state, "/apis/v2beta1/pipelines/upload_version")) == 2


def test_upload_names_the_version_after_the_git_commit_and_does_every_pipeline(api, capsys, tmp_path, monkeypatch):
    host, state = api
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run([*git, "-C", str(tmp_path), "add", "f"], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-qm", "c"], check=True)
    commit = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    monkeypatch.chdir(tmp_path)
    from vlprep_pipelines import engine

    assert main(["upload", "--host", host]) == 0
    assert sorted(p["display_name"] for p in state.pipelines.values()) == sorted(engine.pipelines())
    assert all(vs[-1]["display_name"] == commit for vs in state.versions.values())
    (tmp_path / "f").write_text("changed")
    assert main(["upload", "captions", "--host", host]) == 0
    assert f"version {commit}-dirty uploaded" in capsys.readouterr().out


def test_upload_reports_parameters_without_a_description(tmp_path):
    from vlprep_pipelines import engine

    package = engine.compile_pipeline("captions", tmp_path / "captions.yaml")
    info = engine.pipeline_info(package)
    spec = yaml.safe_load(package.read_text())
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert info["description"] == spec["pipelineInfo"]["description"] != ""
    assert info["undescribed"] == sorted(p for p, d in parameters.items() if not d.get("description"))


# ---------------------------------------------------------------- the CI workflow


def _workflow() -> dict:
    return yaml.safe_load((REPO / ".github" / "workflows" / "vlprep.yml").read_text())


def _makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*):", text, re.MULTILINE)}


def _make_targets_called(command: str) -> set[str]:
    """The targets of each ``make`` in a shell command (variables ``X=...`` and options left out)."""
    words = shlex.split(command.replace("\n", " ; "))
    targets, in_make = set(), False
    for word in words:
        if word in ("&&", "||", ";", "|"):
            in_make = False
        elif word == "make":
            in_make = True
        elif in_make and "=" not in word and not word.startswith("-"):
            targets.add(word)
    return targets


def test_ci_workflow_steps_call_make_targets_that_exist():
    steps = [s for job in _workflow()["jobs"].values() for s in job["steps"]]
    called = set().union(*(_make_targets_called(s.get("run", "")) for s in steps))
    assert {"setup", "lint", "test", "compile", "images", "push", "upload", "submit"} <= called
    assert called - _makefile_targets() == set(), "the workflow calls make targets the Makefile lacks"


def test_ci_workflow_checks_the_golden_ir_and_authenticates_without_keys():
    workflow = _workflow()
    runs = "\n".join(s.get("run", "") for job in workflow["jobs"].values() for s in job["steps"])
    assert "git diff --exit-code pipelines/compiled" in runs
    assert "--wait" in runs  # the smoke run is followed, and fails the job when it fails
    publish = [job for job in workflow["jobs"].values()
               if any("google-github-actions/auth" in s.get("uses", "") for s in job["steps"])]
    assert publish and publish[0]["permissions"]["id-token"] == "write"
    auth = next(s for s in publish[0]["steps"] if "google-github-actions/auth" in s.get("uses", ""))
    assert "workload_identity_provider" in auth["with"] and "credentials_json" not in auth["with"]
