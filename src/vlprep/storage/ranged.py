"""A seekable, buffered binary stream over an object that is read by ranged requests, one per buffer fill
(``limits.CHUNK`` bytes), so that a large object is never held whole and a failed request is retried alone."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import BinaryIO

from vlprep import VlprepError

from .limits import CHUNK


class RangeReader(io.RawIOBase):
    """Reads bytes [start, start + n) of ``uri`` with ``fetch(start, n)``; knows its ``size`` up front."""

    def __init__(self, uri: str, size: int, fetch: Callable[[int, int], bytes]):
        super().__init__()
        self._uri, self._size, self._fetch, self._pos = uri, size, fetch, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        data = self._fetch(self._pos, n)
        if len(data) != n:
            raise VlprepError(f"{self._uri}: asked for {n} bytes at {self._pos}, got {len(data)}: the object "
                              "changed or was cut short while it was being read; rerun")
        buffer[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        blocks = []
        while block := self.read(CHUNK):
            blocks.append(block)
        return b"".join(blocks)


def open_ranged(uri: str, size: int, fetch: Callable[[int, int], bytes]) -> BinaryIO:
    """A buffered stream over an object of ``size`` bytes; an empty object needs no request at all."""
    if not size:
        return io.BytesIO(b"")
    return io.BufferedReader(RangeReader(uri, size, fetch), buffer_size=CHUNK)
