"""The local filesystem as a store: hidden temp files renamed into place (:class:`LocalBuild`), the
writability probe every plan step runs first, and the removal of temp files that killed runs left."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from vlprep import VlprepError


def open_read(uri: str) -> BinaryIO:
    try:
        return open(uri, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file") from None


def exists(uri: str) -> bool:
    return os.path.exists(uri)


def size(uri: str) -> int:
    try:
        return os.path.getsize(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file") from None


def list_prefix(uri: str) -> list[str]:
    root = Path(uri)
    if root.is_file():
        return [str(root)]
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[BinaryIO]:
    build = LocalBuild(uri)
    try:
        with open(build.tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        build.publish()
    except OSError as e:
        if e.filename is None:  # a failed write names no file: name the one being written
            raise OSError(e.errno, e.strerror, uri) from e
        raise
    finally:
        build.discard()


def delete(uri: str) -> None:
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


HOST_TAG = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:24] or "host"
_TMP_OWNER = re.compile(r"\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{12}(\.old)?$")
LEFTOVER_GRACE_S = 3600  # a temp whose writer cannot be asked (another host, no pid) is left this long


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def check_writable(uri: str) -> None:
    """Refuse an output folder that is a file or cannot be written (read-only, no permission, disk
    full) with one clear error, by creating it and writing and removing a probe file."""
    path = Path(uri)
    if path.exists() and not path.is_dir():
        raise VlprepError(f"{uri} is a file; --out must be a folder (remove the file or choose another --out)")
    probe = path / f".tmp-probe.{HOST_TAG}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise VlprepError(f"{uri}: {_why_not_writable(e)}") from None
    finally:
        probe.unlink(missing_ok=True)


def _why_not_writable(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "disk full; free space on that filesystem or choose another --out"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"a file stands in the path ({e.filename}); remove it or choose another --out"
    return f"not writable ({e.strerror}); choose a writable --out"


def remove_leftovers(root: str, *, grace_s: float = LEFTOVER_GRACE_S) -> list[str]:
    """Remove the ``.tmp-*`` files and folders under ``root`` that killed runs left: those whose writer
    (host and pid in the name) is gone from this host, and any other older than ``grace_s``. Temps of
    live writers are kept. Returns the removed paths."""
    removed = []
    for folder, dirs, files in os.walk(root):
        for name in [n for n in dirs + files if n.startswith(".tmp-")]:
            path = os.path.join(folder, name)
            if _abandoned(path, name, grace_s):
                delete(path)
                removed.append(path)
        dirs[:] = [d for d in dirs if not d.startswith(".tmp-")]
    return removed


def _abandoned(path: str, name: str, grace_s: float) -> bool:
    owner = _TMP_OWNER.search(name)
    if owner and owner["host"] == HOST_TAG:
        return not pid_alive(int(owner["pid"]))
    try:
        return time.time() - os.path.getmtime(path) > grace_s
    except FileNotFoundError:
        return False  # its writer published or removed it meanwhile


class LocalBuild:
    """A hidden temp file or directory beside a local ``target``, published atomically.

    The one atomic writer behind every format writer (LMDB, HDF5) and ``local_dir_for`` /
    ``local_file_for``: build under ``tmp`` (``.tmp-<name>.<random>``, which listings skip), then
    :meth:`publish` renames it to ``target``; a directory that exists is swapped out only after the new
    one is complete. :meth:`discard` (or an exception in a ``with`` block) removes ``tmp`` and leaves
    ``target`` as it was; a killed process leaves only the hidden temp.
    """

    def __init__(self, target: str | Path, *, directory: bool = False, overwrite: bool = True):
        self.target = Path(os.path.abspath(target))
        if not overwrite and self.target.exists():
            raise VlprepError(f"{self.target} already exists; remove it or pass overwrite=True")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # the writer's host and pid in the name tell a later run whether the temp is abandoned
        self.tmp = self.target.with_name(f".tmp-{self.target.name}.{HOST_TAG}.{os.getpid()}.{uuid.uuid4().hex[:12]}")
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
