"""Reading shard parts back at merge: ``.npy`` arrays (memory-mapped) and JSON lines.

Parts are format-neutral (arrays and jsonl); the formats users read (TSV, LMDB, HDF5) are rendered
from them by the merge steps. Writing is on :class:`vlprep.shards.Shard` (hashed as written).
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np

from vlprep import storage


def load_npy(uri: str) -> np.ndarray:
    """A whole ``.npy`` part in memory (no pickles)."""
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def read_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line]


class Mapped(contextlib.ExitStack):
    """``.npy`` parts memory-mapped for the length of a ``with`` block (gs:// parts via local copies)."""

    def array(self, uri: str) -> np.ndarray:
        path = self.enter_context(storage.local_copy(uri))
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:  # an empty array (a shard of only bad images) cannot be mapped
            return np.load(path, allow_pickle=False)

    def local(self, uri: str) -> str:
        """A local path to read ``uri`` from while the block lasts."""
        return str(self.enter_context(storage.local_copy(uri)))
