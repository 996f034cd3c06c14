"""Benchmark: streaming VOLTA LMDB build vs upstream's one-transaction build.

For each size, writes a synthetic 13-field TSV (36 boxes x 2048-d features, ~1.1 MB a row), then
builds the LMDB with each method in its own subprocess and reports the child's peak RSS
(``ru_maxrss`` from ``os.wait4``, the per-child figure behind ``getrusage(RUSAGE_CHILDREN)``) and
its throughput (records/s over the build, interpreter start excluded).

Methods:
  streaming  ``vlprep.formats.volta_lmdb.build_lmdb_from_tsv`` (commit every ``--commit-every``)
  volta      BASELINE, as VOLTA ``data/mscoco/convert_coco_lmdb.py``: csv.DictReader rows put in
             one write transaction, ``writemap=True``, 1 TiB map
  loadall    the baseline, but all rows read into a list first

Usage: python bench/bench_lmdb.py [--sizes 1000,2000,5000,10000] [--methods streaming,volta]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

FIELDS = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
          "num_boxes", "boxes", "features", "cls_prob", "attrs", "classes"]  # fmt: skip
BASELINE = "volta"


def write_synthetic_tsv(path: str, n: int, seed: int = 0) -> None:
    """n rows; array payloads rotate over 16 random records (LMDB write cost does not depend on content)."""
    from vlprep.formats.volta_tsv import TsvWriter, encode_record

    rng = np.random.default_rng(seed)
    payloads = []
    for _ in range(16):
        record = {
            "img_id": "x", "img_h": 480, "img_w": 640,
            "obj_ids": rng.integers(0, 1600, 36), "obj_conf": rng.random(36, dtype=np.float32),
            "attr_ids": rng.integers(0, 400, 36), "attr_conf": rng.random(36, dtype=np.float32),
            "boxes": rng.random((36, 4), dtype=np.float32) * 400,
            "features": rng.random((36, 2048), dtype=np.float32),
            "cls_prob": rng.random((36, 1601), dtype=np.float32),
            "attr_prob": rng.random((36, 401), dtype=np.float32),
        }  # fmt: skip
        payloads.append(encode_record(record))
    with open(path, "w", newline="") as f:
        writer = TsvWriter(f)
        for i in range(n):
            writer.write_row({**payloads[i % 16], "img_id": f"COCO_train2014_{i + 1:012d}"})


def worker(method: str, tsv: str, out: str, commit_every: int) -> dict:
    csv.field_size_limit(sys.maxsize)
    t0 = time.perf_counter()
    if method == "streaming":
        from vlprep.formats.volta_lmdb import build_lmdb_from_tsv

        records = build_lmdb_from_tsv([tsv], out, "coco", commit_every=commit_every)["records"]
    else:
        import lmdb

        env = lmdb.open(out, map_size=1 << 40, writemap=True)
        keys = []
        with open(tsv) as f, env.begin(write=True) as txn:
            rows = csv.DictReader(f, delimiter="\t", fieldnames=FIELDS)
            if method == "loadall":
                rows = list(rows)
            for row in rows:
                key = str(int(row["img_id"].split("_")[-1])).encode()
                keys.append(key)
                txn.put(key, pickle.dumps(row))
            txn.put(b"keys", pickle.dumps(keys))
        env.close()
        records = len(keys)
    return {"records": records, "seconds": time.perf_counter() - t0}


def measure(method: str, tsv: str, out: str, commit_every: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--tsv",
        tsv,
        "--out",
        out,
        "--commit-every",
        str(commit_every),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{method} worker failed with exit code {proc.returncode}")
    result = json.loads(stdout)
    data = os.path.join(out, "data.mdb")
    st = os.stat(data)
    result.update(
        peak_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
        rate=result["records"] / result["seconds"],
        file_gb=st.st_size / 1e9,
        disk_gb=st.st_blocks * 512 / 1e9,
    )
    shutil.rmtree(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,2000,5000,10000")
    parser.add_argument("--methods", default="streaming,volta,loadall")
    parser.add_argument("--commit-every", type=int, default=64)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tsv", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tsv, args.out, args.commit_every)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    work = tempfile.mkdtemp(prefix="bench_lmdb.", dir=args.workdir)
    rows = []
    try:
        for n in sizes:
            tsv = os.path.join(work, f"synthetic_{n}.tsv")
            write_synthetic_tsv(tsv, n)
            tsv_gb = os.path.getsize(tsv) / 1e9
            for method in methods:
                r = measure(method, tsv, os.path.join(work, f"{method}_{n}.lmdb"), args.commit_every)
                rows.append({"n": n, "method": method, "tsv_gb": tsv_gb, **r})
                print(
                    f"{n:>6} {method:<10} {r['seconds']:8.1f} s {r['rate']:8.1f} rec/s {r['peak_rss_mb']:9.0f} MB peak RSS"
                    f"   data.mdb {r['file_gb']:.2f} GB apparent, {r['disk_gb']:.2f} GB on disk",
                    flush=True,
                )
            os.unlink(tsv)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nLMDB build, 36x2048 13-field rows, commit every {args.commit_every} (streaming); baseline = {BASELINE}"
    )
    print(
        f"{'records':>8} {'TSV GB':>7} {'method':<10} {'rec/s':>8} {'peak RSS MB':>12} {'RSS ratio':>10} {'speed ratio':>12}"
    )
    for r in rows:
        base = next((b for b in rows if b["n"] == r["n"] and b["method"] == BASELINE), None)
        rss = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.3f}" if base else "-"
        speed = f"{r['rate'] / base['rate']:.2f}" if base else "-"
        print(
            f"{r['n']:>8} {r['tsv_gb']:>7.2f} {r['method']:<10} {r['rate']:>8.1f} {r['peak_rss_mb']:>12.0f} {rss:>10} {speed:>12}"
        )
    print("ratios: method / baseline measured in this run (RSS: lower is better; speed: higher is better)")


if __name__ == "__main__":
    main()
