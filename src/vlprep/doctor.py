"""``vlprep doctor``: can this installation (an image, a laptop) run stages against a store?

Prints the versions of the packages that shape outputs, the devices torch sees (when torch is
installed; the captions image has none) and whether the store takes a write, a read-back and a
delete of a small probe object. Exits non-zero when the store does not. The images run it as their
HEALTHCHECK and default command.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

from vlprep import VlprepError, shards, storage


def devices() -> list[str]:
    """What a stage could compute on: ``cpu`` and every CUDA device torch sees."""
    if importlib.util.find_spec("torch") is None:
        return ["cpu (torch is not installed here: no model stage can run)"]
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    else:
        found.append(f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
    return found


def probe_store(store: str) -> str:
    """Write, read back and delete a probe object directly under ``store``; returns its URI.

    Raises VlprepError naming the store and the failure when any step fails.
    """
    uri = storage.join(store, f"_vlprep-doctor-{os.urandom(6).hex()}")
    payload = os.urandom(64)
    try:
        storage.write_bytes(uri, payload)
        if storage.read_bytes(uri) != payload:
            raise VlprepError(f"{uri}: the probe read back differs from what was written")
        storage.delete(uri)
    except VlprepError:
        raise
    except Exception as e:  # the store's own errors: permissions, network, missing bucket
        raise VlprepError(f"store {store} is not reachable: {type(e).__name__}: {e}") from None
    if storage.exists(uri):
        raise VlprepError(f"{uri}: the probe is still there after its delete")
    return uri


def cmd_doctor(args) -> int:
    print(f"interpreter {sys.executable}")
    for name, version in shards.versions().items():
        print(f"{name} {version}")
    for device in devices():
        print(f"device {device}")
    if args.store:
        return _report_probe(args.store)
    with tempfile.TemporaryDirectory(prefix="vlprep-doctor-") as tmp:
        return _report_probe(tmp)


def _report_probe(store: str) -> int:
    try:
        probe_store(store)
    except VlprepError as e:
        print(f"store {store}: FAILED: {e}")
        return 1
    print(f"store {store}: ok (write, read back, delete)")
    return 0


def add_cli(sub) -> None:
    s = sub.add_parser("doctor", help="versions, devices and whether a store is reachable (the images' health check)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--store", help="directory or gs:// prefix to probe (default: a new local temp directory)")
    s.set_defaults(func=cmd_doctor)
