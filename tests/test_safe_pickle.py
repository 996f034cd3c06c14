"""The one restricted unpickler and the numpy-1.x-compatible pickler (vlprep.safe_pickle)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from vlprep import VlprepError, safe_pickle


class _System:
    def __reduce__(self):
        return (os.system, ("touch should-not-exist",))


def test_refuses_code_and_names_the_file(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": _System()}, protocol=2))
    with pytest.raises(VlprepError, match=r"evil\.pkl: refusing to unpickle global posix\.system"):
        safe_pickle.load_file(path)
    assert not (tmp_path / "should-not-exist").exists()


def test_bytearray_from_a_size_is_refused_before_allocating():
    class Bomb:  # 37 bytes asking for 32 GiB: builtins.bytearray(2**35)
        def __reduce__(self):
            return (bytearray, (2**35,))

    bomb = pickle.dumps(Bomb(), protocol=4)
    assert len(bomb) < 64
    with pytest.raises(VlprepError, match="bomb.pkl: not a readable pickle .*never a size"):
        safe_pickle.loads(bomb, "bomb.pkl")
    # bytearray from data (how protocol-2 pickles of Python 3 may hold bytes) still loads
    assert safe_pickle.loads(pickle.dumps(bytearray(b"abc"), protocol=2)) == bytearray(b"abc")


@pytest.mark.parametrize("data", [b"", b"\x80\x04garbage", pickle.dumps({"a": np.arange(5)})[:-7]])
def test_garbage_and_truncated_pickles_give_one_clear_error(data):
    with pytest.raises(VlprepError, match="value.pkl: not a readable pickle"):
        safe_pickle.loads(data, "value.pkl")


def test_round_trip_with_numpy_1_names_and_protocol_4():
    value = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.float32(2), "c": "x", "d": [1.5, b"y"]}
    data = safe_pickle.dumps(value)
    assert data[:2] == b"\x80\x04" and b"numpy._core" not in data and b"numpy.core" in data
    out = safe_pickle.loads(data)
    np.testing.assert_array_equal(out["a"], value["a"])
    assert out["b"].dtype == np.float32 and out["c"] == "x" and out["d"] == [1.5, b"y"]
    # numpy 2 pickles of every protocol load as well
    for protocol in (2, 4, 5):
        np.testing.assert_array_equal(safe_pickle.loads(pickle.dumps(value, protocol=protocol))["a"], value["a"])


def test_gzipped_file_and_missing_file(tmp_path):
    path = tmp_path / "w.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps({"w": np.ones(3, np.float32)}, protocol=2)))
    np.testing.assert_array_equal(safe_pickle.load_file(path)["w"], np.ones(3, np.float32))
    with pytest.raises(VlprepError, match="missing.pkl: cannot read"):
        safe_pickle.load_file(tmp_path / "missing.pkl")


@pytest.mark.parametrize("opcode", [b"\x8e", b"\x96", b"\x8d"])  # BINBYTES8, BYTEARRAY8, BINUNICODE8
def test_a_declared_length_beyond_the_data_is_refused_before_allocating(opcode):
    """A 20-byte header declaring 8 GiB: refused as truncated, never allocated (run under a 2 GiB
    address-space limit, where an attempt would end in MemoryError instead)."""
    bomb = b"\x80\x04" + opcode + struct.pack("<Q", 2**33) + b"xx."
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from vlprep import VlprepError, safe_pickle\n"
        "try:\n"
        "    safe_pickle.loads(sys.stdin.buffer.read(), 'bomb.pkl')\n"
        "except VlprepError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], input=bomb, capture_output=True, check=True).stdout.decode()
    assert "bomb.pkl: not a readable pickle" in out and "expected" in out, out
    assert "more memory" not in out
