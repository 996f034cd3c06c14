"""``vlprep``: run one stage directly, or a whole pipeline locally / on a Kubeflow cluster.

    vlprep captions --karpathy FILE --dataset coco --out DIR_OR_URI [--test1k-ids FILE] [--shards N]
    vlprep run PIPELINE --local [--config FILE] [--param k=v ...] [--run-name N]
    vlprep compile [PIPELINE ...] [--out pipelines/compiled]
    vlprep submit PIPELINE --host URL [--experiment E] [--run-name N] [--param k=v ...]
    vlprep doctor [--store DIR_OR_URI]

The stage commands never import kfp; run/compile/submit load the pipelines (which do).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from vlprep import VlprepError, shards, storage

log = logging.getLogger("vlprep")


def sample_dir() -> str:
    """The bundled sample dataset (the embedded default)."""
    return str(resources.files("vlprep") / "sample")


def _params(args) -> dict:
    params = {}
    if args.config:
        text = Path(args.config).read_text(encoding="utf-8")
        try:
            import yaml

            params.update(yaml.safe_load(text) or {})
        except Exception as e:
            raise VlprepError(f"{args.config}: not valid YAML/JSON ({e})") from None
    for kv in args.param or []:
        key, sep, value = kv.partition("=")
        if not sep:
            raise VlprepError(f"--param {kv!r}: write key=value")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None


def _defaults(pipeline: str, run_dir: Path) -> dict:
    """Parameters a local run fills in when not given: the store is the run directory."""
    import inspect

    from vlprep_pipelines import LOCAL_PARAMS, engine

    if pipeline in LOCAL_PARAMS:
        return LOCAL_PARAMS[pipeline](sample_dir(), str(run_dir))
    names = inspect.signature(engine.get(pipeline).pipeline_func).parameters
    return {"out": str(run_dir)} if "out" in names else {}


def cmd_run(args) -> int:
    if not args.local:
        raise VlprepError("`vlprep run` runs on this machine: add --local (use `vlprep submit` for a cluster)")
    from vlprep_pipelines import engine

    run_name = args.run_name or f"{args.pipeline}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(args.runs_dir, run_name).resolve()
    params = {**_defaults(args.pipeline, run_dir), **_params(args)}
    record = {
        "run_name": run_name,
        "pipeline": args.pipeline,
        "engine": "kfp.local.SubprocessRunner",
        "params": params,
        "versions": shards.versions(),
        "git_commit": _git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"vlprep: running pipeline {args.pipeline!r} locally as {run_name} -> {run_dir}", flush=True)
    t0 = time.time()
    engine.run_local(args.pipeline, params, run_dir / "_kfp")
    record["seconds"] = round(time.time() - t0, 1)
    record["outputs"] = [
        p for p in storage.list_prefix(str(run_dir))
        if not any(part.startswith("_") for part in Path(p).relative_to(run_dir).parts)
    ]
    record["kfp_artifacts"] = [p for p in storage.list_prefix(str(run_dir / "_kfp")) if "executor_output" not in p]
    storage.write_text(str(run_dir / "run.json"), json.dumps(record, indent=1, ensure_ascii=False))
    from vlprep import report

    storage.write_text(str(run_dir / "report.md"), report.run_markdown(record))
    print(f"\nvlprep: run {run_name} finished in {record['seconds']} s. Outputs:")
    for p in record["outputs"]:
        print(f"  {p}")
    print("Reports and KFP artifacts:")
    for p in record["kfp_artifacts"]:
        print(f"  {p}")
    print(f"Run record: {run_dir / 'run.json'}\nRun report: {run_dir / 'report.md'}")
    return 0


def cmd_compile(args) -> int:
    from vlprep_pipelines import engine

    names = args.pipelines or sorted(engine.pipelines())
    for name in names:
        print(engine.compile_pipeline(name, Path(args.out, f"{name}.yaml")))
    return 0


def cmd_submit(args) -> int:
    from vlprep_pipelines import engine

    run_id = engine.submit(args.pipeline, args.host, _params(args), experiment=args.experiment,
                           run_name=args.run_name, pipeline_root=args.pipeline_root)
    print(f"submitted {args.pipeline} to {args.host}: run {run_id}")
    return 0


def cmd_captions(args) -> int:
    from vlprep.stages import captions

    summary = captions.run(args.karpathy, args.dataset, args.out, args.test1k_ids or "", args.shards)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_regions(args) -> int:
    from vlprep.stages import regions

    if args.action == "extract":
        summary = regions.run(args.images, args.out, args.dataset, args.recipe, args.weights, args.shards,
                              args.format, args.device, args.batch_size, args.workers, args.arch, args.image_root,
                              json.loads(args.recipe_params), build_lmdb=args.lmdb, annotations=args.annotations or "")
        print(f"report: {storage.join(args.out, 'report.html')}")
    elif args.action == "lmdb":
        summary = regions.lmdb(args.out, args.dataset)
    else:
        summary = regions.hard_negatives(args.out, args.annotations, args.dataset)
    print(json.dumps(summary, indent=1))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlprep", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def pipeline_params(s):
        s.add_argument("--config", help="YAML/JSON file of pipeline parameters")
        s.add_argument("--param", action="append", metavar="KEY=VALUE", help="a pipeline parameter (repeatable)")
        s.add_argument("--run-name")

    s = sub.add_parser("run", help="run a pipeline on this machine (kfp.local)")
    s.add_argument("pipeline")
    s.add_argument("--local", action="store_true", help="use the local runner (required)")
    s.add_argument("--runs-dir", default="runs", help="where run directories go (default ./runs)")
    pipeline_params(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("compile", help="compile pipelines to KFP IR YAML")
    s.add_argument("pipelines", nargs="*")
    s.add_argument("--out", default="pipelines/compiled")
    s.set_defaults(func=cmd_compile)

    s = sub.add_parser("submit", help="submit a pipeline run to a KFP cluster")
    s.add_argument("pipeline")
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://HOST/pipeline")
    s.add_argument("--experiment", default="vlprep")
    s.add_argument("--pipeline-root", help="e.g. gs://BUCKET/kfp-root (default: the cluster's)")
    pipeline_params(s)
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("captions", help="VOLTA caption annotations (jsonl) from a Karpathy split file")
    s.add_argument("--karpathy", required=True, help="dataset_coco.json / dataset_flickr30k.json (path or gs://)")
    s.add_argument("--dataset", required=True, choices=["coco", "flickr30k"])
    s.add_argument("--out", required=True, help="output directory or gs:// prefix")
    s.add_argument("--test1k-ids", help="COCO: file of image ids for test1k_ann.jsonl")
    s.add_argument("--shards", type=int, default=1)
    s.set_defaults(func=cmd_captions)

    s = sub.add_parser("regions", help="bottom-up-attention region features (VOLTA / LXMERT)")
    s.add_argument("action", choices=["extract", "lmdb", "hard-negatives"],
                   help="extract: detect, merge TSVs (+ LMDB); lmdb / hard-negatives: rebuild those from merged TSVs")
    s.add_argument("--out", required=True, help="output directory or gs:// prefix")
    s.add_argument("--images", help="image folder / gs:// prefix, list file (.txt) or Karpathy file (.json)")
    s.add_argument("--image-root", default="", help="with a Karpathy file: the folder holding filepath/filename")
    s.add_argument("--dataset", default="coco", choices=["coco", "flickr30k"])
    s.add_argument("--recipe", default="caffe36",
                   help="caffe10-100 | caffe36 | d2-nb36 | d2-maxnms36 | d2-maxnms36-volta | given-boxes")
    s.add_argument("--recipe-params", default="{}", help='JSON overrides, e.g. \'{"nms_start": 0.5}\'')
    s.add_argument("--weights", default="random:0", help="URL, gs://, local path or random:<seed> (offline demo)")
    s.add_argument("--format", default="volta-tsv,lxmert-tsv", help="comma list of volta-tsv, lxmert-tsv, h5")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--workers", type=int, default=2, help="DataLoader decode workers")
    s.add_argument("--shards", type=int, default=1)
    s.add_argument("--arch", default="full", choices=["full", "tiny"], help="tiny: a small test configuration")
    s.add_argument("--no-lmdb", dest="lmdb", action="store_false", help="skip the LMDB build")
    s.add_argument("--annotations", help="caption annotations folder (train_ann.jsonl) for hard_negative.pkl")
    s.set_defaults(func=cmd_regions)

    from vlprep.stages import context

    context.add_cli(sub)  # vlprep ctx phrases | run
    from vlprep import doctor

    doctor.add_cli(sub)  # vlprep doctor [--store URI]
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except VlprepError as e:
        print(f"vlprep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
