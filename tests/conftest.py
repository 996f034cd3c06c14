"""Shared fixtures: the GCS emulator, the S3 server, one fixture per store, the bundled sample, ../shared."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent


def pytest_addoption(parser):
    parser.addoption("--containers", action="store_true",
                     help="run the tests marked `containers` (components in their Docker images: make test-containers)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `containers` need a Docker engine and the built images: they run only with --containers."""
    if config.getoption("--containers"):
        return
    dropped = [item for item in items if item.get_closest_marker("containers")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.get_closest_marker("containers")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """gcp-storage-emulator on 127.0.0.1 with bucket ``vlprep-test``; yields the emulator host URL."""
    port = free_port()
    data = tmp_path_factory.mktemp("gcs")
    proc = subprocess.Popen(
        [str(BIN / "gcp-storage-emulator"), "-d", str(data), "start", "--host", "127.0.0.1", "--port", str(port),
         "--default-bucket", "vlprep-test", "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def gcs(gcs_emulator, monkeypatch):
    """Point google-cloud-storage (and so vlprep.storage) at the emulator; yields a fresh gs:// prefix."""
    from vlprep import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
    storage.reset_after_fork()  # a client made before the environment changed would not see the emulator
    yield f"gs://vlprep-test/{os.urandom(4).hex()}"
    storage.reset_after_fork()


S3_BUCKET = "vlprep-test"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API server (a real HTTP S3 endpoint) on 127.0.0.1 with bucket ``vlprep-test``; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=60)
        endpoint = f"http://127.0.0.1:{port}"
        import boto3

        boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
            aws_secret_access_key="test",
        ).create_bucket(Bucket=S3_BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


def s3_environment(monkeypatch, endpoint: str, config_dir: Path) -> None:
    """Point boto3 (and so vlprep.storage) at ``endpoint`` with test keys, and at nothing else: no profile,
    config file or instance metadata of this machine may leak in."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLPREP_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_dir / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(config_dir / "aws-credentials"))


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """Point boto3 (and so vlprep.storage) at the S3 server; yields a fresh s3:// prefix."""
    from vlprep import storage

    s3_environment(monkeypatch, s3_server, tmp_path)
    storage.reset_after_fork()
    yield f"s3://{S3_BUCKET}/{os.urandom(4).hex()}"
    storage.reset_after_fork()


@pytest.fixture(params=["local", "gs", "s3"])
def store(request, tmp_path):
    """A fresh, empty root in each store: a local folder, gs:// on the emulator, s3:// on the S3 server.
    ``@pytest.mark.parametrize("store", ["gs", "s3"], indirect=True)`` narrows it."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue({"gs": "gcs", "s3": "s3"}[request.param])


@pytest.fixture(scope="session")
def sample() -> Path:
    from vlprep.sample import sample_dir

    return Path(sample_dir())


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"reference folder {SHARED} is absent (golden fixtures live there)")
    return SHARED
