"""Options every workflow command shares: the fan-out and how steps run."""

from __future__ import annotations

import argparse
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


def print_json(doc: dict) -> None:
    print(json.dumps(doc, indent=1, ensure_ascii=False))
