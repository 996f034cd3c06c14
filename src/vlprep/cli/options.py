"""Options every workflow command shares: the fan-out and how steps run.

Numbers and JSON are parsed by the ``type=`` functions below, so a bad value is refused by argparse
itself (one ``vlprep <command>: error: ...`` line, exit 2) before any work starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math

from vlprep.shards import SPLITS
from vlprep.stage import DEVICE_FORMS, device_problem


def positive_int(text: str) -> int:
    """An integer >= 1 (shard counts, batch sizes)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 1 or more")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (worker counts, 0 = a default)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not an integer") from None


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (learning rates, margins)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number >= 0")
    return value


def json_object(text: str) -> dict:
    """A JSON object (``{"key": value, ...}``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: give a JSON object such as '{{\"nms_thresh\": 0.3}}'")
    return value


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def fan_out(p: argparse.ArgumentParser, flag: str = "--shards", what: str = "shards") -> None:
    p.add_argument(flag, type=positive_int, default=1, help=f"number of {what}")


def split(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="balanced", choices=SPLITS,
                   help="balanced (sizes differ by at most one) or group (upstream's --group_id/--total_group)")


def runtime(p: argparse.ArgumentParser, device: str, batch_size: int | None = 8, workers: int = 2) -> None:
    p.add_argument("--device", type=device_name, default=device, help=DEVICE_FORMS)
    if batch_size is not None:
        p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--workers", "--num-workers", dest="workers", type=non_negative_int, default=workers,
                   help="DataLoader decode processes")


def devices(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", default="",
                   help="run shards concurrently, one worker process per device (overrides --device): auto (every "
                        "GPU, else cpu:1), cpu:N (N processes, the cores split between them), cuda, cuda:0,cuda:1 "
                        "or cuda:0,1; fewer shards than devices are raised to the device count")


def use_devices(args: argparse.Namespace, *shard_flags: str) -> contextlib.AbstractContextManager:
    """With ``--devices``: set ``args.device`` to the workers' device and each shard count (``args.<flag>``)
    to at least the device count; returns the block the stage runs in (``vlprep.devices.active``)."""
    from vlprep import devices

    if not args.devices:
        return devices.active(None)
    chosen = devices.parse(args.devices)
    if hasattr(args, "device"):
        args.device = chosen.runtime_device
    for flag in shard_flags:
        setattr(args, flag, chosen.shards(getattr(args, flag), "--" + flag.replace("_", "-")))
    return devices.active(chosen)


def print_json(doc: dict) -> None:
    print(json.dumps(doc, indent=1, ensure_ascii=False))
