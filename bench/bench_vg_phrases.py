"""Peak memory of the streaming VG phrase builder vs ``json.load`` (upstream's way) on the same files.

Writes synthetic Visual Genome ``attributes.json`` / ``relationships.json`` of growing size from a
FIXED vocabulary (so the phrase set is the same size at every file size), then runs, each in a fresh
subprocess, (a) ``json.load`` of both files one after the other (as upstream does) and (b)
``vlprep.data.visual_genome.build_phrases``, and prints each one's peak RSS and the ratio.

    python bench/bench_vg_phrases.py --sizes-mb 20 80
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HEADS = [f"thing{i}.n.01" for i in range(120)]
ATTRS = [f"attr{i}" for i in range(40)]
PREDS = [f"rel{i}" for i in range(12)]
REL_HEADS = HEADS[:25]  # relation phrases <= 25 * 12 * 25

CHILD = r"""
import json, resource, sys, time
mode, attributes, relationships = sys.argv[1:4]
start = time.perf_counter()
phrases = None
if mode == "json.load":
    for path in (attributes, relationships):
        with open(path) as f:
            doc = json.load(f)
        del doc
elif mode == "build_phrases":
    from vlprep.data import visual_genome as vg
    phrases = len(vg.build_phrases(attributes, relationships))
else:  # interpreter + imports only
    from vlprep.data import visual_genome as vg
    import ijson
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - start, "phrases": phrases}))
"""


def _object(rng: random.Random, i: int) -> dict:
    return {
        "object_id": i,
        "x": rng.randrange(500), "y": rng.randrange(500), "w": rng.randrange(1, 200), "h": rng.randrange(1, 200),
        "names": ["thing"],
        "synsets": rng.sample(HEADS, rng.choice((1, 1, 1, 2))),
        "attributes": rng.sample(ATTRS, rng.randrange(0, 4)),
    }  # fmt: skip


def _relationship(rng: random.Random, i: int) -> dict:
    def side(j: int) -> dict:
        return {"object_id": j, "name": "thing", "synsets": rng.sample(REL_HEADS, rng.choice((0, 1, 1, 2)))}

    return {"relationship_id": i, "predicate": rng.choice(PREDS), "synsets": [], "subject": side(2 * i), "object": side(2 * i + 1)}


def write_vg_file(path: Path, key: str, make, target_bytes: int, seed: int) -> None:
    """A JSON list of ``{"image_id": n, key: [...]}`` entries, written until ``target_bytes``."""
    rng = random.Random(seed)
    counter = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        image_id = 0
        while f.tell() < target_bytes:
            items = []
            for _ in range(rng.randrange(5, 30)):
                items.append(make(rng, counter))
                counter += 1
            f.write(("," if image_id else "") + json.dumps({"image_id": image_id, key: items}))
            image_id += 1
        f.write("]")


def measure(mode: str, attributes: Path, relationships: Path) -> dict:
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(attributes), str(relationships)],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[20, 80], help="size of EACH file, MB")
    parser.add_argument("--workdir", default=None, help="where to write the synthetic files (default: a temp dir)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-vg-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        idle = measure("imports", work / "none", work / "none")
        print(f"interpreter + imports only: peak RSS {idle['peak_mib']:.0f} MiB")
        print(f"{'file MB':>8} {'json.load MiB':>14} {'builder MiB':>12} {'builder/json':>13} {'json s':>7} {'builder s':>10} {'phrases':>8}")
        rows = []
        for mb in args.sizes_mb:
            attributes, relationships = work / f"attributes_{mb:g}.json", work / f"relationships_{mb:g}.json"
            write_vg_file(attributes, "attributes", _object, int(mb * 1e6), seed=1)
            write_vg_file(relationships, "relationships", _relationship, int(mb * 1e6), seed=2)
            base = measure("json.load", attributes, relationships)
            ours = measure("build_phrases", attributes, relationships)
            rows.append((mb, base, ours))
            print(
                f"{mb:>8g} {base['peak_mib']:>14.0f} {ours['peak_mib']:>12.0f} {ours['peak_mib'] / base['peak_mib']:>13.3f}"
                f" {base['seconds']:>7.1f} {ours['seconds']:>10.1f} {ours['phrases']:>8}"
            )
            attributes.unlink()
            relationships.unlink()
        if len(rows) > 1:
            (mb0, b0, o0), (mb1, b1, o1) = rows[0], rows[-1]
            print(
                f"from {mb0:g} to {mb1:g} MB per file: json.load peak x{b1['peak_mib'] / b0['peak_mib']:.2f}, "
                f"builder peak x{o1['peak_mib'] / o0['peak_mib']:.2f} (phrases {o0['phrases']} -> {o1['phrases']})"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
