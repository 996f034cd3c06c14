"""vlprep.storage against the local filesystem and the real google-cloud-storage client on the emulator."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading

import pytest

from vlprep import VlprepError, storage

MB = 1024 * 1024


def test_local_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a" / "out.bin"
    with pytest.raises(RuntimeError):
        with storage.open_write(str(target)) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list((tmp_path / "a").iterdir()) == []  # no temp file left behind
    storage.write_bytes(str(target), b"done")
    assert target.read_bytes() == b"done"


def test_local_list_exists_delete(tmp_path):
    for name in ["b/2.txt", "a.txt", "b/1.txt"]:
        storage.write_text(str(tmp_path / name), name)
    assert storage.list_prefix(str(tmp_path)) == sorted(str(tmp_path / n) for n in ["a.txt", "b/1.txt", "b/2.txt"])
    assert storage.exists(str(tmp_path / "a.txt"))
    storage.delete(str(tmp_path / "b"))
    assert storage.list_prefix(str(tmp_path)) == [str(tmp_path / "a.txt")]


def test_local_dir_publish_is_all_or_nothing(tmp_path):
    target = tmp_path / "db.lmdb"
    with pytest.raises(ValueError):
        with storage.local_dir_for(str(target)) as d:
            (d / "data.mdb").write_bytes(b"x")
            raise ValueError
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with storage.local_dir_for(str(target)) as d:
        (d / "data.mdb").write_bytes(b"x")
    assert (target / "data.mdb").read_bytes() == b"x"


def test_gcs_round_trip_list_delete(gcs):
    storage.write_text(f"{gcs}/x/a.txt", "héllo")
    storage.write_bytes(f"{gcs}/x/b.bin", b"\x00\x01")
    assert storage.read_text(f"{gcs}/x/a.txt") == "héllo"
    assert storage.exists(f"{gcs}/x/b.bin") and not storage.exists(f"{gcs}/x/c.bin")
    assert storage.list_prefix(f"{gcs}/x") == [f"{gcs}/x/a.txt", f"{gcs}/x/b.bin"]
    assert storage.sha256(f"{gcs}/x/b.bin") == hashlib.sha256(b"\x00\x01").hexdigest()
    storage.delete(f"{gcs}/x")
    assert storage.list_prefix(f"{gcs}/x") == []
    with pytest.raises(FileNotFoundError, match="no such object"):
        storage.read_bytes(f"{gcs}/missing")


def test_gcs_listing_over_1000_objects(gcs):
    from google.cloud import storage as gcs_lib

    bucket = gcs_lib.Client().bucket("vlprep-test")
    prefix = gcs.split("/", 3)[3]
    for i in range(1050):  # bypass our writer for speed; listing is what is tested
        bucket.blob(f"{prefix}/many/{i:05d}").upload_from_string(b"")
    listed = storage.list_prefix(f"{gcs}/many")
    assert len(listed) == 1050  # the API pages at 1000: paging must be followed
    assert listed == sorted(listed) and listed[-1].endswith("/01049")


def test_gcs_failed_upload_never_appears(gcs):
    uri = f"{gcs}/failed.bin"
    with pytest.raises(OSError):
        with storage.open_write(uri) as f:
            f.write(os.urandom(storage.CHUNK + 12345))  # the first chunk is already sent
            raise OSError("source died half-way")
    assert not storage.exists(uri)


def test_gcs_missing_bucket_is_one_clear_line(gcs):
    with pytest.raises(VlprepError) as e:
        storage.write_text("gs://no-such-bucket-xyz/a.txt", "x")
    assert str(e.value).count("\n") == 0
    assert "gs://no-such-bucket-xyz" in str(e.value) and "does not exist" in str(e.value)


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


class _FlakyProxy:
    """TCP proxy to the emulator that cuts a connection once, after ``cut_after`` request bytes in all."""

    def __init__(self, target_port: int, cut_after: int):
        self.target_port, self.cut_after, self.cut, self.total = target_port, cut_after, False, 0
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
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()
        pump(client, upstream, True)


def test_gcs_transient_failure_mid_upload(gcs, monkeypatch):
    """The connection drops in the middle of a chunk: the object is absent or complete, never partial."""
    port = int(os.environ["STORAGE_EMULATOR_HOST"].rsplit(":", 1)[1])
    proxy = _FlakyProxy(port, cut_after=storage.CHUNK + 3 * MB)  # inside the second chunk
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setattr(storage, "_client", None)
    data = os.urandom(3 * storage.CHUNK)
    uri = f"{gcs}/flaky.bin"
    try:
        storage.write_bytes(uri, data)
        failed = False
    except Exception:
        failed = True
    assert proxy.cut, "the proxy never cut the upload: the test did not test anything"
    if failed:
        assert not storage.exists(uri)
        storage.write_bytes(uri, data)  # what a retried task does
    assert storage.read_bytes(uri) == data


def test_gcs_streams_100mb_with_flat_memory(gcs, tmp_path):
    """Write then read back a 160 MB object through the stream API in a child process; peak RSS stays flat."""
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
        r = subprocess.run([sys.executable, str(script), f"{gcs}/stream-{n}.bin", str(n)], capture_output=True,
                           text=True, env=os.environ.copy(), timeout=600)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.strip().splitlines()[-1])

    small, big = peak_mb(16), peak_mb(160)
    # 144 MB more data may cost at most a few MB more memory: the object is never held whole
    assert big - small < 40, (small, big)


def test_gcs_dir_publish_keeps_the_old_output_until_the_new_one_is_whole(gcs, monkeypatch):
    uri = f"{gcs}/feat.lmdb"
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


@pytest.mark.parametrize("uri", ["gs://", "gs:/bucket/x", "gs:bucket/x", "GS://bucket/x", "gs:///x", "s3://b/k",
                                 "gs://Bad_Bucket!/x"])
def test_malformed_uris_are_errors_never_local_folders(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VlprepError, match="URI"):
        storage.write_text(storage.join(uri, "a.txt"), "x")
    assert os.listdir(tmp_path) == []  # no local folder named gs: or s3:


def test_local_names_with_a_colon_later_are_still_local(tmp_path):
    uri = str(tmp_path / "run:1" / "a.txt")
    storage.write_text(uri, "x")
    assert storage.read_text(uri) == "x" and storage.read_text("./" + os.path.relpath(uri)) == "x"
