"""Options every workflow command shares: the fan-out and how steps run."""

from __future__ import annotations

import argparse
import contextlib
import json

from vlprep.shards import SPLITS


def fan_out(p: argparse.ArgumentParser, flag: str = "--shards", what: str = "shards") -> None:
    p.add_argument(flag, type=int, default=1, help=f"number of {what}")


def split(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="balanced", choices=SPLITS,
                   help="balanced (sizes differ by at most one) or group (upstream's --group_id/--total_group)")


def runtime(p: argparse.ArgumentParser, device: str, batch_size: int | None = 8, workers: int = 2) -> None:
    p.add_argument("--device", default=device, help="auto, cpu or cuda")
    if batch_size is not None:
        p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--workers", "--num-workers", dest="workers", type=int, default=workers,
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
