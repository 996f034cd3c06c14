"""The one pickle module: a restricted unpickler for files from outside, and a pickler whose output
numpy 1.x can read.

Reading. Pickles we read (detectron2 / Caffe2 weights, VOLTA LMDB values, ``hard_negative.pkl``,
X-LXMERT cluster maps) are untrusted: :func:`loads` / :func:`load_file` rebuild only numpy arrays,
scalars and dtypes, plain containers and bytes; any other global is refused before it runs, with a
``VlprepError`` naming the file. Nothing it admits allocates more than the pickle itself holds:
``bytearray(n)`` is admitted only from bytes-like data, never from a size (a 37-byte pickle asking for
``bytearray(2**35)`` is refused, not attempted), and every length an opcode declares is checked
against the bytes that follow before the C unpickler allocates it (a 20-byte ``BINBYTES8`` header
declaring 32 GiB is refused as truncated).

Writing. VOLTA's environment runs Python 3.6 with numpy 1.x, which cannot import ``numpy._core``
(the numpy 2 module names). :func:`dumps` writes protocol 4 with numpy internals named
``numpy.core.*``, which both numpy 1.x and 2.x load.
"""

from __future__ import annotations

import builtins
import codecs
import collections
import gzip
import io
import pickle
import pickletools
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vlprep import VlprepError

PROTOCOL = 4  # Python 3.6 reads up to 4
_GZIP_MAGIC = b"\x1f\x8b"


def _bytearray(data: Any = b"", *args: Any) -> bytearray:
    """``bytearray`` from data only: an integer size would allocate what the pickle never held."""
    if not isinstance(data, (bytes, bytearray, str, list, tuple)):
        raise pickle.UnpicklingError(f"bytearray({type(data).__name__}) is refused: only data, never a size")
    return bytearray(data, *args)


def _allowed() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray, numeric

    allowed: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("_codecs", "encode")] = codecs.encode  # bytes in protocol-2 pickles written by Python 3
    for py in ("builtins", "__builtin__"):  # __builtin__: Python 2 pickles (Detectron / Caffe2 zoo)
        for name in ("dict", "list", "tuple", "set", "frozenset", "complex", "slice"):
            allowed[(py, name)] = getattr(builtins, name)
        allowed[(py, "bytearray")] = _bytearray
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy data and plain containers only; refuses every other global and persistent id."""

    def __init__(self, file: BinaryIO, *, source: str, encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)  # latin1: numpy arrays in Python 2 pickles
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed()
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise VlprepError(
                f"{self.source}: refusing to unpickle global {module}.{name}: this file may only hold numpy "
                "arrays and plain containers. Do not load it unless you trust where it came from."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise VlprepError(f"{self.source}: refusing a pickle persistent id ({str(pid)[:60]!r}); not a data pickle")


def _check_lengths(data: bytes) -> None:
    """Walk the opcodes in pure Python (which reads only what is there): a declared length longer than
    the data raises here, before the C unpickler would allocate it."""
    for _ in pickletools.genops(io.BytesIO(data)):
        pass


def load(f: BinaryIO, source: str) -> Any:
    """Unpickle from an open binary file; every failure is one ``VlprepError`` naming ``source``."""
    try:
        data = f.read()
        _check_lengths(data)
        return RestrictedUnpickler(io.BytesIO(data), source=source).load()
    except VlprepError:
        raise
    except MemoryError:
        raise VlprepError(f"{source}: the pickle asks for more memory than this machine has; not a valid file") from None
    except Exception as e:  # truncated, garbage, wrong protocol, a refused bytearray size, ...
        raise VlprepError(f"{source}: not a readable pickle ({type(e).__name__}: {str(e)[:200]})") from None


def loads(data: bytes, source: str = "pickle data") -> Any:
    return load(io.BytesIO(data), source)


def load_file(path: str | Path) -> Any:
    """Unpickle a local file, gunzipping it first when it is gzip (by magic number)."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == _GZIP_MAGIC
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            return load(f, str(path))
    except OSError as e:
        raise VlprepError(f"{path}: cannot read ({e})") from None


class _CompatPickler(pickle._Pickler):
    """Pure-Python pickler that names numpy internals ``numpy.core.*`` (loadable by numpy 1.x and 2.x)."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None) or ""
        if module == "numpy._core" or module.startswith("numpy._core."):
            name = name or obj.__qualname__
            self.write(pickle.GLOBAL + f"numpy.core{module[len('numpy._core') :]}\n{name}\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def dumps(obj: Any) -> bytes:
    """Pickle readable by Python 3.6 with numpy 1.x (VOLTA's, X-LXMERT's environments): protocol 4."""
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else [obj]
    if all(type(v) in (str, bytes, int, float) for v in items):  # exact: np.float64 subclasses float
        return pickle.dumps(obj, protocol=PROTOCOL)  # no numpy inside: the fast C pickler
    buf = io.BytesIO()
    _CompatPickler(buf, protocol=PROTOCOL).dump(obj)
    return buf.getvalue()
