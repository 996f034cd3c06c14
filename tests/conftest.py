"""Shared fixtures: the GCS emulator, the bundled sample, the ../shared reference folder."""

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
    monkeypatch.setattr(storage, "_client", None)
    yield f"gs://vlprep-test/{os.urandom(4).hex()}"
    monkeypatch.setattr(storage, "_client", None)


@pytest.fixture(scope="session")
def sample() -> Path:
    from vlprep.cli import sample_dir

    return Path(sample_dir())


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"reference folder {SHARED} is absent (golden fixtures live there)")
    return SHARED
