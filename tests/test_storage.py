"""vlprep.storage: one suite run on every store (a local folder, gs:// through the real google-cloud-storage
client on the GCS emulator, s3:// through boto3 on moto's S3 server), plus each store's own failure modes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import S3_BUCKET

from vlprep import VlprepError, storage

MB = 1024 * 1024
REMOTE = pytest.mark.parametrize("store", ["gs", "s3"], indirect=True)


def _scheme(store: str) -> str | None:
    return store.split("://")[0] if "://" in store else None


def _raw_client(store: str):
    """The client library itself, bypassing vlprep.storage (to set up or inspect a store)."""
    if _scheme(store) == "gs":
        from google.cloud import storage as gcs_lib

        return gcs_lib.Client().bucket("vlprep-test")
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=os.environ["VLPREP_S3_ENDPOINT"])


def _leftovers(store: str) -> list[str]:
    """What a failed write could leave behind that listings do not show: local temp files, S3 multipart
    uploads never completed nor aborted. (An unfinished GCS resumable upload is not observable.)"""
    if _scheme(store) is None:
        return [str(p) for p in Path(store).rglob("*") if p.is_file()] if Path(store).exists() else []
    if _scheme(store) == "s3":
        uploads = _raw_client(store).list_multipart_uploads(Bucket=S3_BUCKET).get("Uploads", [])
        return [u["Key"] for u in uploads if u["Key"].startswith(store.split("/", 3)[3])]
    return []


def _point_at(store: str, url: str, monkeypatch) -> None:
    """Send the store's client to another server (a proxy or a broken server on 127.0.0.1)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST" if _scheme(store) == "gs" else "VLPREP_S3_ENDPOINT", url)
    storage.reset_after_fork()


# ---------------------------------------------------------------- the same behaviour on every store


def test_failed_write_leaves_nothing(store):
    target = storage.join(store, "a", "out.bin")
    with pytest.raises(RuntimeError, match="killed"):
        with storage.open_write(target) as f:
            f.write(os.urandom(storage.CHUNK + 12345))  # a first chunk / part is already sent
            raise RuntimeError("killed")
    assert not storage.exists(target) and storage.list_prefix(store) == []
    assert _leftovers(store) == []
    storage.write_bytes(target, b"done")
    assert storage.read_bytes(target) == b"done"


def test_round_trip_list_size_delete(store):
    storage.write_text(storage.join(store, "x/a.txt"), "héllo")
    storage.write_bytes(storage.join(store, "x/b.bin"), b"\x00\x01")
    storage.write_bytes(storage.join(store, "x/sub/c.bin"), b"")
    storage.write_text(storage.join(store, "xy/d.txt"), "a sibling, not inside x")
    assert storage.read_text(storage.join(store, "x/a.txt")) == "héllo"
    assert storage.read_bytes(storage.join(store, "x/sub/c.bin")) == b""
    assert storage.exists(storage.join(store, "x/b.bin")) and not storage.exists(storage.join(store, "x/c.bin"))
    assert storage.size(storage.join(store, "x/a.txt")) == len("héllo".encode())
    x = storage.join(store, "x")
    assert storage.list_prefix(x) == [storage.join(x, n) for n in ["a.txt", "b.bin", "sub/c.bin"]]
    assert storage.list_prefix(storage.join(store, "x/a.txt")) == [storage.join(x, "a.txt")]
    assert storage.sha256(storage.join(x, "b.bin")) == hashlib.sha256(b"\x00\x01").hexdigest()
    storage.delete(x)
    assert storage.list_prefix(x) == [] and storage.list_prefix(store) == [storage.join(store, "xy/d.txt")]
    storage.delete(x)  # missing is not an error
    with pytest.raises(FileNotFoundError, match="no such"):
        storage.read_bytes(storage.join(store, "missing"))
    with pytest.raises(FileNotFoundError, match="no such"):
        storage.size(storage.join(store, "missing"))


def test_open_read_iterates_lines_and_seeks(store):
    lines = [f"row {i} {'x' * (i % 50)}\n".encode() for i in range(200_000)]  # about 7 MB: spans reads
    data = b"".join(lines)
    uri = storage.join(store, "rows.jsonl")
    storage.write_bytes(uri, data)
    with storage.open_read(uri) as f:
        assert list(f) == lines
    with storage.open_read(uri) as f:
        f.seek(len(data) - 10)
        assert f.read() == data[-10:]
        f.seek(1000)
        assert f.read(20) == data[1000:1020] and f.tell() == 1020


def test_listing_over_1000_objects(store):
    # bypass our writer for speed: listing is what is tested
    if _scheme(store) is None:
        Path(store, "many").mkdir(parents=True)
        for i in range(1001):
            Path(store, "many", f"{i:05d}").write_bytes(b"")
    else:
        client, prefix = _raw_client(store), store.split("/", 3)[3]
        if _scheme(store) == "gs":
            def put(i):
                client.blob(f"{prefix}/many/{i:05d}").upload_from_string(b"")
        else:
            def put(i):
                client.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/many/{i:05d}", Body=b"")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, range(1001)))
    listed = storage.list_prefix(storage.join(store, "many"))
    assert len(listed) == 1001  # the APIs page at 1000: paging must be followed
    assert listed == sorted(listed) and listed[-1].endswith("/01000")


def test_local_file_and_dir_helpers(store):
    uri = storage.join(store, "model.bin")
    with storage.local_file_for(uri) as path:
        path.write_bytes(b"weights")
    with storage.local_copy(uri) as path:
        assert path.read_bytes() == b"weights"
    db = storage.join(store, "feat.lmdb")
    with storage.local_dir_for(db) as d:
        (d / "data.mdb").write_bytes(b"old")
        (d / "stale.mdb").write_bytes(b"only in the old output")
    with storage.local_dir_for(db) as d:
        (d / "data.mdb").write_bytes(b"new")
        (d / "sub").mkdir()
        (d / "sub" / "lock.mdb").write_bytes(b"lock")
    assert storage.list_prefix(db) == [storage.join(db, "data.mdb"), storage.join(db, "sub/lock.mdb")]
    assert storage.read_bytes(storage.join(db, "data.mdb")) == b"new"
    with pytest.raises(ValueError), storage.local_dir_for(db) as d:
        (d / "data.mdb").write_bytes(b"half")
        raise ValueError
    assert storage.read_bytes(storage.join(db, "data.mdb")) == b"new"


def test_streams_large_objects_with_flat_memory(store, tmp_path):
    """Write then read back a 160 MB file or object through the stream API in a child process; peak RSS
    stays flat."""
    script = tmp_path / "stream.py"
    script.write_text(
        "import hashlib, resource, sys\n"
        "from vlprep import storage\n"
        "uri, n = sys.argv[1], int(sys.argv[2])\n"
        "block = bytes(range(256)) * 4096  # 1 MiB\n"
        "h = hashlib.sha256()\n"
        "with storage.open_write(uri) as f:\n"
        "    for i in range(n):\n"
        "        f.write(block); h.update(block)\n"
        "g = hashlib.sha256(); size = 0\n"
        "with storage.open_read(uri) as f:\n"
        "    while b := f.read(1 << 20):\n"
        "        g.update(b); size += len(b)\n"
        "assert g.hexdigest() == h.hexdigest() and size == n << 20, (size, n)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )

    def peak_mb(n: int) -> int:
        r = subprocess.run([sys.executable, str(script), storage.join(store, f"stream-{n}.bin"), str(n)],
                           capture_output=True, text=True, env=os.environ.copy(), timeout=600)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.strip().splitlines()[-1])

    small, big = peak_mb(16), peak_mb(160)
    # 144 MB more data may cost at most a few MB more memory: the object is never held whole
    assert big - small < 40, (small, big)


# ---------------------------------------------------------------- object stores: publishing and faults


@REMOTE
def test_dir_publish_keeps_the_old_output_until_the_new_one_is_whole(store, monkeypatch):
    uri = storage.join(store, "feat.lmdb")
    with storage.local_dir_for(uri) as d:
        (d / "data.mdb").write_bytes(b"old data")
        (d / "stale.mdb").write_bytes(b"only in the old output")
    uploaded = []
    real_upload = storage.upload_file

    def failing_upload(local, target):
        uploaded.append(target)
        if len(uploaded) == 2:
            raise OSError("connection reset")  # the second file of the new output fails
        real_upload(local, target)

    monkeypatch.setattr(storage, "upload_file", failing_upload)
    with pytest.raises(OSError), storage.local_dir_for(uri) as d:
        (d / "data.mdb").write_bytes(b"new data")
        (d / "lock.mdb").write_bytes(b"new lock")
    # nothing of the old output was deleted while the new one was incomplete
    assert storage.read_bytes(f"{uri}/stale.mdb") == b"only in the old output"
    monkeypatch.setattr(storage, "upload_file", real_upload)
    with storage.local_dir_for(uri) as d:
        (d / "data.mdb").write_bytes(b"new data")
        (d / "lock.mdb").write_bytes(b"new lock")
    assert storage.list_prefix(uri) == [f"{uri}/data.mdb", f"{uri}/lock.mdb"]  # stale objects go last
    assert storage.read_bytes(f"{uri}/data.mdb") == b"new data"


class _FlakyProxy:
    """TCP proxy to a server that cuts one connection once, after ``cut_after`` bytes in all have gone
    upstream (``upstream=True``: requests) or downstream (responses)."""

    def __init__(self, target_port: int, cut_after: int, *, upstream: bool = True):
        self.target_port, self.cut_after, self.upstream = target_port, cut_after, upstream
        self.cut, self.total = False, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client):
        upstream = socket.create_connection(("127.0.0.1", self.target_port))

        def pump(src, dst, count):
            try:
                while data := src.recv(65536):
                    if count:
                        self.total += len(data)
                        if not self.cut and self.total > self.cut_after:
                            self.cut = True
                            raise ConnectionResetError
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, client, not self.upstream), daemon=True).start()
        pump(client, upstream, self.upstream)

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread, which then ends
        self.sock.close()


def _server_port(store: str) -> int:
    name = "STORAGE_EMULATOR_HOST" if _scheme(store) == "gs" else "VLPREP_S3_ENDPOINT"
    return int(os.environ[name].rsplit(":", 1)[1])


@REMOTE
def test_transient_failure_mid_upload(store, monkeypatch):
    """The connection drops in the middle of a chunk: the object is absent or complete, never partial."""
    proxy = _FlakyProxy(_server_port(store), cut_after=storage.CHUNK + 3 * MB)  # inside the second chunk
    _point_at(store, f"http://127.0.0.1:{proxy.port}", monkeypatch)
    data = os.urandom(3 * storage.CHUNK)
    uri = storage.join(store, "flaky.bin")
    try:
        storage.write_bytes(uri, data)
        failed = False
    except VlprepError:
        failed = True
    assert proxy.cut, "the proxy never cut the upload: the test did not test anything"
    if failed:
        assert not storage.exists(uri)
        storage.write_bytes(uri, data)  # what a retried task does
    assert storage.read_bytes(uri) == data
    proxy.close()


@REMOTE
def test_connection_cut_mid_download_is_read_again(store, monkeypatch):
    data = os.urandom(2 * storage.CHUNK + 77)
    uri = storage.join(store, "cut.bin")
    storage.write_bytes(uri, data)
    proxy = _FlakyProxy(_server_port(store), cut_after=storage.CHUNK + 2 * MB, upstream=False)
    _point_at(store, f"http://127.0.0.1:{proxy.port}", monkeypatch)
    assert storage.read_bytes(uri) == data
    assert proxy.cut, "the proxy never cut the download: the test did not test anything"
    proxy.close()


@REMOTE
def test_missing_bucket_is_one_clear_line(store):
    uri = f"{_scheme(store)}://no-such-bucket-xyz/a.txt"
    with pytest.raises(VlprepError) as e:
        storage.write_text(uri, "x")
    assert str(e.value).count("\n") == 0
    assert f"{_scheme(store)}://no-such-bucket-xyz" in str(e.value) and "does not exist" in str(e.value)


def test_gcs_missing_credentials_is_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE", "STORAGE_EMULATOR", "CLOUDSDK"))}
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), GCE_METADATA_HOST="127.0.0.1:9",
               GCE_METADATA_IP="127.0.0.1:9", NO_GCE_CHECK="True")
    r = subprocess.run([sys.executable, "-c", "from vlprep.cli import main; import sys; sys.exit(main(['captions', "
                        "'--karpathy', 'gs://some-bucket/dataset_coco.json', '--dataset', 'coco', '--out', "
                        f"{str(tmp_path / 'o')!r}]))"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "no Google Cloud credentials found" in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


def test_s3_missing_credentials_is_one_clear_line(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage.reset_after_fork()
    with pytest.raises(VlprepError, match="no S3 credentials found") as e:
        storage.read_bytes(storage.join(s3, "a.txt"))
    assert str(e.value).count("\n") == 0


@contextlib.contextmanager
def _silent_server():
    """Accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held = []

    def serve():
        while True:
            try:
                held.append(sock.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield sock.getsockname()[1]
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        for conn in held:
            conn.close()


@contextlib.contextmanager
def _answering_server(status: int, code: str):
    """Answers every request with ``status`` and an S3-style error body naming ``code``."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = f"<Error><Code>{code}</Code><Message>refused</Message></Error>".encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _unavailable_server():
    return _answering_server(503, "ServiceUnavailable")


@REMOTE
@pytest.mark.parametrize("server", [_silent_server, _unavailable_server], ids=["silent", "503"])
def test_an_unavailable_store_ends_in_one_clear_error_within_the_deadline(store, server, monkeypatch):
    monkeypatch.setenv("VLPREP_STORAGE_DEADLINE", "3")
    uri = storage.join(store, "a.txt")
    with server() as port:
        _point_at(store, f"http://127.0.0.1:{port}", monkeypatch)
        t0 = time.monotonic()
        with pytest.raises(VlprepError) as e:
            storage.write_text(uri, "x")
        elapsed = time.monotonic() - t0
    message = str(e.value)
    assert message.count("\n") == 0 and message.startswith(uri) and "VLPREP_STORAGE_DEADLINE" in message
    assert elapsed < 90, elapsed  # a bound, not a benchmark: before, such failures took 97-223 s


@REMOTE
def test_refused_access_is_one_clear_line_saying_what_to_grant(store, monkeypatch):
    with _answering_server(403, "AccessDenied") as port:
        _point_at(store, f"http://127.0.0.1:{port}", monkeypatch)
        with pytest.raises(VlprepError) as e:
            storage.write_text(storage.join(store, "a.txt"), "x")
    message = str(e.value)
    assert message.count("\n") == 0 and message.startswith(storage.join(store, "a.txt"))
    assert ("roles/storage.objectAdmin" if _scheme(store) == "gs" else "s3:PutObject") in message


def test_s3_refused_credentials_are_one_clear_line(s3, monkeypatch):
    with _answering_server(403, "InvalidAccessKeyId") as port:
        _point_at(s3, f"http://127.0.0.1:{port}", monkeypatch)
        with pytest.raises(VlprepError) as e:
            storage.read_bytes(storage.join(s3, "a.txt"))
    assert str(e.value).count("\n") == 0 and "is denied" in str(e.value) and "AWS_ACCESS_KEY_ID" in str(e.value)


def test_cli_reports_an_unavailable_store_in_one_line(s3, tmp_path):
    with _silent_server() as port:
        env = {**os.environ, "VLPREP_S3_ENDPOINT": f"http://127.0.0.1:{port}", "VLPREP_STORAGE_DEADLINE": "2"}
        r = subprocess.run([sys.executable, "-m", "vlprep.cli", "captions", "--karpathy",
                            storage.join(s3, "k.json"), "--dataset", "coco", "--out", str(tmp_path / "o")],
                           env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("vlprep: error: s3://") and r.stderr.strip().count("\n") == 0, r.stderr
    assert "storage service is unavailable" in r.stderr


@REMOTE
def test_a_forked_child_makes_its_own_clients(store):
    storage.write_text(storage.join(store, "parent.txt"), "p")  # the parent has a client now
    pid = os.fork()
    if pid == 0:  # the child: no client inherited, and its own works
        code = 3
        try:
            if storage.gcs._client is None and not storage.s3._clients:
                storage.write_text(storage.join(store, "child.txt"), "c")
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert storage.read_text(storage.join(store, "child.txt")) == "c"


def test_storage_deadline_must_be_a_positive_number(monkeypatch):
    monkeypatch.setenv("VLPREP_STORAGE_DEADLINE", "soon")
    with pytest.raises(VlprepError, match="VLPREP_STORAGE_DEADLINE='soon'"):
        storage.limits.deadline()


# ---------------------------------------------------------------- local files and URI validation


def test_local_build_swaps_a_directory_only_when_complete(tmp_path):
    target = tmp_path / "out.lmdb"
    target.mkdir()
    (target / "data.mdb").write_text("old")
    with pytest.raises(RuntimeError), storage.LocalBuild(target, directory=True) as b:
        (b.tmp / "data.mdb").write_text("half")
        raise RuntimeError("killed")
    assert (target / "data.mdb").read_text() == "old" and os.listdir(tmp_path) == ["out.lmdb"]
    with storage.LocalBuild(target, directory=True) as b:
        (b.tmp / "data.mdb").write_text("new")
    assert (target / "data.mdb").read_text() == "new" and os.listdir(tmp_path) == ["out.lmdb"]
    with pytest.raises(VlprepError, match="already exists"):
        storage.LocalBuild(target, directory=True, overwrite=False)


@pytest.mark.parametrize("uri", ["gs://", "gs:/bucket/x", "gs:bucket/x", "GS://bucket/x", "gs:///x", "gs://Bad_Bucket!/x",
                                 "s3://", "s3:/bucket/x", "s3:bucket/x", "S3://bucket/x", "s3:///x", "s3://b/k",
                                 "s3://Bad_Bucket/x", "minio://bucket/x"])
def test_malformed_uris_are_errors_never_local_folders(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VlprepError, match="URI"):
        storage.write_text(storage.join(uri, "a.txt"), "x")
    assert os.listdir(tmp_path) == []  # no local folder named gs: or s3:


def test_local_names_with_a_colon_later_are_still_local(tmp_path):
    uri = str(tmp_path / "run:1" / "a.txt")
    storage.write_text(uri, "x")
    assert storage.read_text(uri) == "x" and storage.read_text("./" + os.path.relpath(uri)) == "x"
    assert not storage.is_remote(uri) and storage.is_remote("s3://bucket/k") and not storage.is_gcs("s3://bucket/k")
