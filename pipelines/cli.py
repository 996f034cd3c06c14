"""``vlprep run | compile | submit | upload``: the pipeline commands (they need kfp; the workflow commands
do not).

    vlprep run PIPELINE --local [--config FILE] [--param k=v ...] [--run-name N] [--runs-dir DIR] [--verbose]
    vlprep compile [PIPELINE ...] [--out pipelines/compiled]
    vlprep submit PIPELINE --host URL [--experiment E] [--run-name N] [--param k=v ...]
                  [--sample-store URI] [--wait [--timeout S] [--poll S]]
    vlprep upload [PIPELINE ...] --host URL [--version REV]

``vlprep.cli.main`` hands these commands here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vlprep import VlprepError, shards, storage
from vlprep.sample import sample_dir


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


def _git_version() -> str:
    """The version name of what is checked out: the short commit, ``-dirty`` if tracked files changed."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        raise VlprepError("not in a git checkout: name the version with --version") from None
    return commit + ("-dirty" if dirty else "")


def _defaults(pipeline: str, run_dir: Path) -> dict:
    """Parameters a local run fills in when not given: the store is the run directory."""
    import inspect

    from vlprep_pipelines import LOCAL_PARAMS, engine

    if pipeline in LOCAL_PARAMS:
        return LOCAL_PARAMS[pipeline](sample_dir(), str(run_dir))
    names = inspect.signature(engine.get(pipeline).pipeline_func).parameters
    return {"out": str(run_dir)} if "out" in names else {}


def _verbose(args) -> bool:
    return bool(args.verbose) or os.environ.get("VLPREP_VERBOSE", "").strip().lower() in ("1", "true", "yes")


def _run_pipeline(name: str, params: dict, run_dir: Path, verbose: bool) -> None:
    """kfp.local's whole output here (``verbose``), or one line per task here and the rest in the run's log;
    a failed task is an error showing the end of its output."""
    from vlprep_pipelines import engine, run_log

    if verbose:
        engine.run_local(name, params, run_dir / "_kfp")
        return
    log_path = run_dir / "logs" / "run.log"
    print(f"tasks (kfp.local's output: {log_path}; --verbose shows it here):", flush=True)
    with run_log.quiet(log_path, sys.stdout) as tasks:
        try:
            engine.run_local(name, params, run_dir / "_kfp")
        except RuntimeError as e:  # kfp.local: "Pipeline ... finished with status FAILURE ..."
            failure = str(e)
        else:
            return
    print(tasks.failure_report(log_path), file=sys.stderr)
    raise VlprepError(run_log.plain(failure))


def _print_summary(record: dict, run_dir: Path, verbose: bool) -> None:
    print(f"\nvlprep: run {record['run_name']} finished in {record['seconds']} s.")
    if verbose:
        print("Outputs:")
        for p in record["outputs"]:
            print(f"  {p}")
    else:
        print(f"{len(record['outputs'])} output files, each listed in the run report.")
    print("Reports and KFP artifacts:")
    for p in record["kfp_artifacts"]:
        print(f"  {p}")
    if not verbose:
        print(f"Run log: {run_dir / 'logs' / 'run.log'}")
    print(f"Run record: {run_dir / 'run.json'}\nRun report: {run_dir / 'report.md'}")


def cmd_run(args) -> int:
    if not args.local:
        raise VlprepError("`vlprep run` runs on this machine: add --local (use `vlprep submit` for a cluster)")
    from vlprep_pipelines import engine

    from vlprep.reports.run import random_lines, run_markdown, weights_used

    name = engine.canonical(args.pipeline)
    run_name = args.run_name or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(args.runs_dir, run_name).resolve()
    params = {**_defaults(name, run_dir), **_params(args)}
    record = {
        "run_name": run_name,
        "pipeline": name,
        "engine": "kfp.local.SubprocessRunner",
        "params": params,
        "versions": shards.versions(),
        "git_commit": _git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"vlprep: running pipeline {name!r} locally as {run_name} -> {run_dir}", flush=True)
    t0 = time.time()
    _run_pipeline(name, params, run_dir, _verbose(args))
    record["seconds"] = round(time.time() - t0, 1)
    record["outputs"] = [
        p for p in storage.list_prefix(str(run_dir))
        if not any(part.startswith("_") for part in Path(p).relative_to(run_dir).parts)
        and Path(p).relative_to(run_dir).parts[0] != "logs"
    ]
    record["kfp_artifacts"] = [p for p in storage.list_prefix(str(run_dir / "_kfp")) if "executor_output" not in p]
    record["weights"] = weights_used({str(p.relative_to(run_dir)): json.loads(p.read_text(encoding="utf-8"))
                                      for p in run_dir.rglob("settings.json")
                                      if "_work" in p.parts and "_kfp" not in p.relative_to(run_dir).parts})
    storage.write_text(str(run_dir / "run.json"), json.dumps(record, indent=1, ensure_ascii=False))
    storage.write_text(str(run_dir / "report.md"), run_markdown(record))
    _print_summary(record, run_dir, _verbose(args))
    for line in random_lines(record["weights"]):
        print(f"WARNING: {line}")
    return 0


def cmd_compile(args) -> int:
    from vlprep_pipelines import engine

    names = [engine.canonical(n) for n in args.pipelines] or sorted(engine.pipelines())
    for name in names:
        print(engine.compile_pipeline(name, Path(args.out, f"{name}.yaml")))
    return 0


def _sample_params(pipeline: str, store: str) -> dict:
    """Parameters that run ``pipeline`` on the bundled sample, copied to ``store``/sample (which the pods can
    read), writing to ``store``/run: the local run's parameters, on the store."""
    from vlprep_pipelines import LOCAL_PARAMS

    if pipeline not in LOCAL_PARAMS:
        raise VlprepError(f"--sample-store: {pipeline!r} has no parameters for the sample; "
                          f"use one of {', '.join(sorted(LOCAL_PARAMS))}")
    root, sample = Path(sample_dir()), storage.join(store, "sample")
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.suffix not in (".py", ".pyc"):
            storage.upload_file(f, storage.join(sample, f.relative_to(root).as_posix()))
    return LOCAL_PARAMS[pipeline](sample, storage.join(store, "run"))


def cmd_submit(args) -> int:
    from vlprep_pipelines import engine

    name = engine.canonical(args.pipeline)
    params = {**(_sample_params(name, args.sample_store) if args.sample_store else {}), **_params(args)}
    run_id = engine.submit(name, args.host, params, experiment=args.experiment, run_name=args.run_name,
                           pipeline_root=args.pipeline_root)
    print(f"submitted {args.pipeline} to {args.host}: run {run_id}\n{engine.run_url(args.host, run_id)}", flush=True)
    if not args.wait:
        return 0
    state, error = engine.wait_for_run(args.host, run_id, timeout=args.timeout, poll=args.poll,
                                       on_state=lambda state: print(f"run {run_id}: {state}", flush=True))
    if state == "SUCCEEDED":
        return 0
    print(f"vlprep: error: run {run_id} ended {state}{': ' + error if error else ''}; see "
          f"{engine.run_url(args.host, run_id)}", file=sys.stderr)
    return 1


def cmd_upload(args) -> int:
    from vlprep_pipelines import engine

    version = args.version or _git_version()
    names = [engine.canonical(n) for n in args.pipelines] or sorted(engine.pipelines())
    for name in names:
        done = engine.upload(name, args.host, version)
        print(f"{name}: version {version} {'uploaded' if done['created'] else 'was already there'}: "
              f"{engine.pipeline_url(args.host, done['pipeline_id'], done['version_id'])}", flush=True)
        if done["undescribed"]:
            print(f"  note: parameters without a description in the UI: {', '.join(done['undescribed'])}")
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: write a positive number of seconds")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlprep", description="vlprep pipelines: run locally, compile, submit, upload")
    sub = p.add_subparsers(dest="command", required=True)

    def pipeline_params(s):
        s.add_argument("--config", help="YAML/JSON file of pipeline parameters")
        s.add_argument("--param", action="append", metavar="KEY=VALUE", help="a pipeline parameter (repeatable)")
        s.add_argument("--run-name")

    s = sub.add_parser("run", help="run a pipeline on this machine (kfp.local)")
    s.add_argument("pipeline")
    s.add_argument("--local", action="store_true", help="use the local runner (required)")
    s.add_argument("--runs-dir", default="runs", help="where run directories go (default ./runs)")
    s.add_argument("--verbose", action="store_true",
                   help="show kfp.local's whole output (also VLPREP_VERBOSE=1); default: one line per task")
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
    s.add_argument("--sample-store", metavar="URI",
                   help="run on the bundled sample: copy it to URI/sample, write to URI/run (e.g. a CI smoke run)")
    s.add_argument("--wait", action="store_true", help="follow the run; exit 1 unless it succeeds")
    s.add_argument("--timeout", type=_seconds, default=6 * 3600.0, help="with --wait: give up after S s (6 h)")
    s.add_argument("--poll", type=_seconds, default=15.0, help="with --wait: ask for the run's state every S s")
    pipeline_params(s)
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("upload", help="publish pipelines to the cluster's UI as versions of named pipelines")
    s.add_argument("pipelines", nargs="*", help="default: every pipeline")
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://HOST/pipeline")
    s.add_argument("--version", help="the version's name (default: the git commit, -dirty if changed)")
    s.set_defaults(func=cmd_upload)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except VlprepError as e:
        print(f"vlprep: error: {e}", file=sys.stderr)
        return 2
