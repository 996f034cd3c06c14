"""One storage API over local paths, ``gs://bucket/key`` and ``s3://bucket/key`` URIs.

Every write is atomic: a reader never sees a partial file or object.
- Local (:mod:`.local`): data goes to a hidden temp file in the target directory, is fsynced, then renamed.
- GCS (:mod:`.gcs`): a resumable upload; the object exists only once its last chunk is finalized, and an
  upload that fails is cancelled, so it never appears.
- S3 / MinIO (:mod:`.s3`): one PUT, or a multipart upload that is completed last and aborted on failure.

Every call to a store is bounded: retries with backoff end within ``VLPREP_STORAGE_DEADLINE`` seconds
(default 60) in one :class:`VlprepError` (:mod:`.limits`). Clients are made per process: a forked child
(a DataLoader worker) drops its parent's on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from . import gcs, local, s3, uris
from .limits import CHUNK
from .local import LocalBuild
from .uris import join, parent

__all__ = [
    "CHUNK", "LocalBuild", "delete", "exists", "is_gcs", "is_remote", "join", "list_prefix", "local_copy",
    "local_dir_for", "local_file_for", "open_read", "open_write", "parent", "read_bytes", "read_text",
    "reset_after_fork", "sha256", "size", "upload_file", "write_bytes", "write_text",
]

_STORES = {None: local, "gs": gcs, "s3": s3}


def _store(uri: str):
    return _STORES[uris.scheme(uri)]


def is_gcs(uri: str) -> bool:
    """True for ``gs://BUCKET/...``; a malformed URI that only looks like one is an error, never a local path."""
    return uris.scheme(uri) == "gs"


def is_remote(uri: str) -> bool:
    """True for an object-store URI (``gs://``, ``s3://``), False for a local path; malformed URIs are errors."""
    return uris.scheme(uri) is not None


def reset_after_fork(*_) -> None:
    """Forget the store clients (and the buckets checked with them): a forked process must make its own.
    Runs by itself in every forked child; also usable as a ``worker_init_fn``."""
    gcs.reset()
    s3.reset()


os.register_at_fork(after_in_child=reset_after_fork)


# ---------------------------------------------------------------- reading


def open_read(uri: str) -> BinaryIO:
    """A binary, seekable stream over the file or object (streams; does not load it whole)."""
    uri = str(uri)
    return _store(uri).open_read(uri)


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def exists(uri: str) -> bool:
    uri = str(uri)
    return _store(uri).exists(uri)


def size(uri: str) -> int:
    uri = str(uri)
    return _store(uri).size(uri)


def list_prefix(uri: str) -> list[str]:
    """All files/objects at or under a path or prefix (recursive, as in a folder: ``a`` holds ``a/b`` but
    not ``ab``), as full URIs, sorted."""
    uri = str(uri)
    return _store(uri).list_prefix(uri)


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
    with _store(uri).open_write(uri) as f:
        yield f


def write_bytes(uri: str, data: bytes) -> None:
    with open_write(uri) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def upload_file(local_path: str | Path, uri: str) -> None:
    """Copy a local file to ``uri`` (streamed, atomic)."""
    with open(local_path, "rb") as src, open_write(uri) as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def delete(uri: str) -> None:
    """Delete a file/object or everything under a directory/prefix. Missing is not an error."""
    uri = str(uri)
    _store(uri).delete(uri)


@contextlib.contextmanager
def local_dir_for(uri: str) -> Iterator[Path]:
    """A local directory whose contents are published to ``uri`` when the block succeeds.

    For writers that need a real filesystem (LMDB, HDF5). Local targets are built beside the target
    and swapped in (:class:`LocalBuild`); for an object store every new file is uploaded (each atomically)
    before any old object under the prefix that the new output lacks is deleted, so the previous good
    output is never removed before the new one is whole.
    """
    uri = str(uri)
    if not is_remote(uri):
        build = LocalBuild(uri, directory=True)
        try:
            yield build.tmp
            build.publish()
        finally:
            build.discard()
        return
    with tempfile.TemporaryDirectory(prefix="vlprep-") as tmp:
        yield Path(tmp)
        new = {join(uri, str(f.relative_to(tmp))): f for f in sorted(Path(tmp).rglob("*")) if f.is_file()}
        stale = [u for u in list_prefix(uri) if u not in new and u.startswith(uri.rstrip("/") + "/")]
        for target, f in new.items():
            upload_file(f, target)
        for u in stale:
            delete(u)


@contextlib.contextmanager
def local_file_for(uri: str) -> Iterator[Path]:
    """A local path to write a whole file to; published to ``uri`` when the block succeeds."""
    uri = str(uri)
    if not is_remote(uri):
        build = LocalBuild(uri)
        try:
            yield build.tmp
            build.publish()
        finally:
            build.discard()
        return
    with tempfile.TemporaryDirectory(prefix="vlprep-") as tmp:
        path = Path(tmp, Path(uris.split(uri)[1]).name or "object")
        yield path
        upload_file(path, uri)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path to read ``uri`` from (downloaded to a temp file for an object store)."""
    uri = str(uri)
    if not is_remote(uri):
        if not os.path.exists(uri):
            raise FileNotFoundError(f"{uri}: no such file")
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="vlprep-") as tmp:
        path = Path(tmp, Path(uris.split(uri)[1]).name or "object")
        with open_read(uri) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        yield path
