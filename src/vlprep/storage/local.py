"""The local filesystem as a store: hidden temp files renamed into place (:class:`LocalBuild`)."""

from __future__ import annotations

import contextlib
import os
import shutil
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
