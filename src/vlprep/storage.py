"""One storage API over local paths and ``gs://bucket/key`` URIs.

Every write is atomic: a reader never sees a partial file or object.
- Local: data goes to a hidden temp file in the target directory, is fsynced, then renamed.
- GCS: data is sent as a resumable upload; an object only exists once its last chunk is
  finalized, and an upload that fails or is interrupted is cancelled, so it never appears.

GCS goes through google-cloud-storage. ``STORAGE_EMULATOR_HOST`` (e.g. the gcp-storage-emulator)
is honoured by that library itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from vlprep import VlprepError

CHUNK = 8 * 1024 * 1024  # read/write block and GCS resumable chunk size (a multiple of 256 KiB)


_BUCKET = re.compile(r"[a-z0-9]([a-z0-9._-]{0,220}[a-z0-9])?")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def is_gcs(uri: str) -> bool:
    """True for ``gs://BUCKET/...``; a malformed URI that only looks like one is an error, never a local path."""
    uri = str(uri)
    if uri.startswith("gs://"):
        bucket = uri[len("gs://"):].split("/", 1)[0]
        if not _BUCKET.fullmatch(bucket):
            raise VlprepError(f"{uri}: not a valid gs:// URI (bucket {bucket!r}); write gs://BUCKET/path")
        return True
    scheme = _SCHEME.match(uri)
    if scheme:
        raise VlprepError(
            f"{uri}: {scheme.group(0)!r} looks like a URI scheme, but only gs://BUCKET/path and local paths are "
            "supported; fix the URI (e.g. gs:/b -> gs://b), or write ./" + uri + " for a local file of that name"
        )
    return False


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a gs:// URI."""
    base = str(base)
    if is_gcs(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts if p])
    return str(Path(base, *parts))


def parent(uri: str) -> str:
    """The directory or prefix holding ``uri``."""
    uri = str(uri)
    return uri.rstrip("/").rsplit("/", 1)[0] if is_gcs(uri) else str(Path(uri).parent)


def _split(uri: str) -> tuple[str, str]:
    rest = uri[len("gs://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise VlprepError(f"{uri}: not a valid gs:// URI; write gs://BUCKET/path")
    return bucket, key


_client = None
_checked_buckets: set[str] = set()


def _gcs_client():
    global _client
    if _client is None:
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import storage as gcs

        try:
            _client = gcs.Client()
        except DefaultCredentialsError as e:
            raise VlprepError(
                "no Google Cloud credentials found: run `gcloud auth application-default login`, "
                "set GOOGLE_APPLICATION_CREDENTIALS, or use workload identity on GKE "
                f"({e.__class__.__name__})"
            ) from None
    return _client


def reset_after_fork(*_) -> None:
    """Forget the gs:// client (and the buckets checked with it): a forked process, such as a
    DataLoader worker, must make its own. Usable as a ``worker_init_fn``."""
    global _client
    _client = None
    _checked_buckets.clear()


def _bucket(uri: str):
    from google.api_core import exceptions as gexc

    name, key = _split(uri)
    bucket = _gcs_client().bucket(name)
    if name in _checked_buckets:
        return bucket, key
    try:
        found = bucket.exists()
    except gexc.Forbidden:
        raise VlprepError(
            f"{uri}: access to bucket gs://{name} is forbidden; grant the service account "
            "roles/storage.objectAdmin on it"
        ) from None
    if not found:
        raise VlprepError(f"{uri}: bucket gs://{name} does not exist; create it or fix the URI")
    _checked_buckets.add(name)
    return bucket, key


def _blob(uri: str):
    bucket, key = _bucket(uri)
    if not key:
        raise VlprepError(f"{uri}: names a bucket, not an object")
    return bucket.blob(key, chunk_size=CHUNK)


# ---------------------------------------------------------------- reading


def open_read(uri: str) -> BinaryIO:
    """A binary stream over the file or object (streams; does not load it whole)."""
    uri = str(uri)
    if is_gcs(uri):
        from google.api_core import exceptions as gexc

        blob = _blob(uri)
        try:
            blob.reload()
        except gexc.NotFound:
            raise FileNotFoundError(f"{uri}: no such object") from None
        if not blob.size:  # nothing to stream (and a ranged read of 0 bytes is ill-formed)
            return io.BytesIO(b"")
        return blob.open("rb", chunk_size=CHUNK)
    try:
        return open(uri, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file") from None


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def exists(uri: str) -> bool:
    uri = str(uri)
    if is_gcs(uri):
        bucket, key = _bucket(uri)
        return bool(key) and bucket.blob(key).exists()
    return os.path.exists(uri)


def size(uri: str) -> int:
    uri = str(uri)
    if is_gcs(uri):
        blob = _blob(uri)
        blob.reload()
        return int(blob.size)
    return os.path.getsize(uri)


def list_prefix(uri: str) -> list[str]:
    """All files/objects under a prefix (recursive), as full URIs, sorted."""
    uri = str(uri)
    if is_gcs(uri):
        bucket, key = _bucket(uri)
        name = bucket.name
        return sorted(f"gs://{name}/{b.name}" for b in _gcs_client().list_blobs(name, prefix=key))
    root = Path(uri)
    if root.is_file():
        return [str(root)]
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))


def sha256(uri: str) -> str:
    h = hashlib.sha256()
    with open_read(uri) as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[BinaryIO]:
    """Write a file or object atomically: it appears only if the ``with`` block succeeds."""
    uri = str(uri)
    if is_gcs(uri):
        blob = _blob(uri)
        # BlobWriter cancels the resumable upload when the block raises.
        with blob.open("wb", chunk_size=CHUNK, ignore_flush=True) as f:
            yield f
        return
    build = LocalBuild(uri)
    try:
        with open(build.tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        build.publish()
    finally:
        build.discard()


def write_bytes(uri: str, data: bytes) -> None:
    with open_write(uri) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def upload_file(local: str | Path, uri: str) -> None:
    """Copy a local file to ``uri`` (streamed, atomic)."""
    with open(local, "rb") as src, open_write(uri) as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def delete(uri: str) -> None:
    """Delete a file/object or everything under a directory/prefix. Missing is not an error."""
    uri = str(uri)
    if is_gcs(uri):
        bucket, key = _bucket(uri)
        for item in list_prefix(uri):
            k = _split(item)[1]
            if k == key or k.startswith(key.rstrip("/") + "/"):
                bucket.blob(k).delete()
        return
    p = Path(uri)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBuild:
    """A hidden temp file or directory beside a local ``target``, published atomically.

    The one atomic writer behind every format writer (LMDB, HDF5) and :func:`local_dir_for` /
    :func:`local_file_for`: build under ``tmp`` (``.tmp-<name>.<random>``, which listings skip), then
    :meth:`publish` renames it to ``target``; a directory that exists is swapped out only after the new
    one is complete. :meth:`discard` (or an exception in a ``with`` block) removes ``tmp`` and leaves
    ``target`` as it was; a killed process leaves only the hidden temp.
    """

    def __init__(self, target: str | Path, *, directory: bool = False, overwrite: bool = True):
        self.target = Path(os.path.abspath(target))
        if not overwrite and self.target.exists():
            raise VlprepError(f"{self.target} already exists; remove it or pass overwrite=True")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.target.with_name(f".tmp-{self.target.name}.{uuid.uuid4().hex[:12]}")
        if directory:
            self.tmp.mkdir()

    def publish(self) -> Path:
        old = None
        if self.target.is_dir() and not self.target.is_symlink():
            old = self.tmp.with_name(self.tmp.name + ".old")
            os.rename(self.target, old)
        elif self.tmp.is_dir() and self.target.exists():
            self.target.unlink()  # a file (or link) where the directory goes
        os.replace(self.tmp, self.target)
        _fsync_dir(self.target.parent)
        if old is not None:
            shutil.rmtree(old)
        return self.target

    def discard(self) -> None:
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> LocalBuild:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.publish()
        else:
            self.discard()


@contextlib.contextmanager
def local_dir_for(uri: str) -> Iterator[Path]:
    """A local directory whose contents are published to ``uri`` when the block succeeds.

    For writers that need a real filesystem (LMDB, HDF5). Local targets are built beside the target
    and swapped in (:class:`LocalBuild`); for gs:// every new file is uploaded (each atomically) before
    any old object under the prefix that the new output lacks is deleted, so the previous good output
    is never removed before the new one is whole.
    """
    uri = str(uri)
    if is_gcs(uri):
        with tempfile.TemporaryDirectory(prefix="vlprep-") as tmp:
            yield Path(tmp)
            new = {join(uri, str(f.relative_to(tmp))): f for f in sorted(Path(tmp).rglob("*")) if f.is_file()}
            stale = [u for u in list_prefix(uri) if u not in new and u.startswith(uri.rstrip("/") + "/")]
            for target, f in new.items():
                upload_file(f, target)
            for u in stale:
                delete(u)
        return
    build = LocalBuild(uri, directory=True)
    try:
        yield build.tmp
        build.publish()
    finally:
        build.discard()


@contextlib.contextmanager
def local_file_for(uri: str) -> Iterator[Path]:
    """A local path to write a whole file to; published to ``uri`` when the block succeeds."""
    uri = str(uri)
    if not is_gcs(uri):
        build = LocalBuild(uri)
        try:
            yield build.tmp
            build.publish()
        finally:
            build.discard()
        return
    with tempfile.TemporaryDirectory(prefix="vlprep-") as tmp:
        local = Path(tmp, Path(_split(uri)[1]).name or "object")
        yield local
        upload_file(local, uri)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path to read ``uri`` from (downloaded to a temp file for gs://)."""
    uri = str(uri)
    if not is_gcs(uri):
        if not os.path.exists(uri):
            raise FileNotFoundError(f"{uri}: no such file")
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="vlprep-") as tmp:
        local = Path(tmp, Path(_split(uri)[1]).name or "object")
        with open_read(uri) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        yield local
