"""Caption stage vs upstream's extract_captions.py logic, on a synthetic Karpathy file of COCO's size.

Baseline (named ``upstream``): VOLTA's script logic — json.load, filter per split, jsonlines writer —
run once per output file as its .sh does. Prints seconds and the ratio ours/upstream (lower is better),
measured in the same run. Usage: python bench/bench_captions.py [--images 123287]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jsonlines

from vlprep.stages import captions


def make_karpathy(path: Path, n: int) -> None:
    splits = ["train"] * 83 + ["restval"] * 30 + ["val"] * 5 + ["test"] * 5
    images = [{"split": splits[i % len(splits)], "filename": f"COCO_val2014_{i:012d}.jpg", "filepath": "val2014",
               "cocoid": i, "sentences": [{"raw": f"A photo number {i} with caption {k}.", "tokens": []}
                                          for k in range(5)]} for i in range(n)]
    path.write_text(json.dumps({"images": images}))


def upstream(infile: Path, outdir: Path) -> None:
    for name, split in {"train": "train", "valid": "val", "test": "test"}.items():
        lst = json.load(open(infile))["images"]  # the script reloads the file for every split
        split_list = [e for e in lst if e["split"] == split]
        if split == "train":
            split_list += [e for e in lst if e["split"] == "restval"]
        with jsonlines.open(outdir / f"{name}_ann.jsonl", mode="w") as writer:
            for e in split_list:
                writer.write({"sentences": [d["raw"] for d in e["sentences"]], "id": e["cocoid"]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=123287)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "dataset_coco.json"
        make_karpathy(src, args.images)
        (tmp / "up").mkdir()
        t = time.perf_counter()
        upstream(src, tmp / "up")
        base = time.perf_counter() - t
        print(f"upstream (baseline)      {base:7.2f} s")
        for n in (1, 4):
            t = time.perf_counter()
            captions.run(str(tmp / f"ours{n}"), captions.Settings(karpathy=str(src)), num_shards=n)
            ours = time.perf_counter() - t
            same = all((tmp / f"ours{n}" / f).read_bytes() == (tmp / "up" / f).read_bytes()
                       for f in ("train_ann.jsonl", "valid_ann.jsonl", "test_ann.jsonl"))
            print(f"vlprep, {n} shard(s), 1 process {ours:7.2f} s  ratio ours/upstream {ours / base:5.2f}  "
                  f"identical output: {same}")


if __name__ == "__main__":
    main()
