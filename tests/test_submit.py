"""`vlprep submit` through kfp.Client against a loopback server that records the REST calls."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlprep.cli import main


class _Api(BaseHTTPRequestHandler):
    calls: list = []

    def log_message(self, *args):
        pass

    def _reply(self, body: dict):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.calls.append(("GET", self.path, None))
        if self.path.startswith("/apis/v2beta1/healthz"):
            return self._reply({"multi_user": False})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiments": [], "total_size": 0})
        if self.path.startswith("/apis/v2beta1/runs/"):
            return self._reply({"run_id": "run-123", "state": "RUNNING"})
        self._reply({})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.calls.append(("POST", self.path, body))
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        if self.path.startswith("/apis/v2beta1/runs"):
            return self._reply({"run_id": "run-123", "display_name": body.get("display_name"),
                                "experiment_id": body.get("experiment_id")})
        self._reply({})


@pytest.fixture
def api():
    _Api.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Api.calls
    server.shutdown()


def test_submit_creates_experiment_and_run(api, capsys, monkeypatch):
    host, calls = api
    monkeypatch.setenv("HOME", "/nonexistent")  # no local kube or kfp config may leak in
    rc = main(["submit", "captions", "--host", host, "--experiment", "nightly", "--run-name", "coco-captions",
               "--param", "karpathy=gs://b/dataset_coco.json", "--param", "out=gs://b/annotations",
               "--param", "num_shards=16"])
    assert rc == 0
    assert "run run-123" in capsys.readouterr().out
    posts = [(p, b) for m, p, b in calls if m == "POST"]
    exp = [b for p, b in posts if p.startswith("/apis/v2beta1/experiments")]
    assert exp and exp[0]["display_name"] == "nightly"
    run = [b for p, b in posts if p.startswith("/apis/v2beta1/runs")][0]
    assert run["display_name"] == "coco-captions" and run["experiment_id"] == "exp-1"
    spec = run["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "captions"
    assert run["runtime_config"]["parameters"] == {"karpathy": "gs://b/dataset_coco.json",
                                                   "out": "gs://b/annotations", "num_shards": 16}


def test_submit_unknown_pipeline(api, capsys):
    host, _ = api
    assert main(["submit", "nope", "--host", host]) == 2
    assert "unknown pipeline 'nope'" in capsys.readouterr().err
