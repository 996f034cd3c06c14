"""``vlprep``: run one workflow's stage directly, or a whole pipeline locally / on a Kubeflow cluster.

    vlprep captions --karpathy FILE --dataset coco --out DIR_OR_URI [--test1k-ids FILE] [--shards N]
    vlprep regions extract|lmdb|hard-negatives ...
    vlprep context phrases|run ...          (``ctx`` is an alias)
    vlprep xlxmert extract|kmeans ...
    vlprep vokens train|tokenize|keys|vokenize ...
    vlprep run PIPELINE --local [--config FILE] [--param k=v ...] [--run-name N]
    vlprep compile [PIPELINE ...] [--out pipelines/compiled]
    vlprep submit PIPELINE --host URL [--experiment E] [--run-name N] [--param k=v ...] [--wait]
    vlprep upload [PIPELINE ...] --host URL [--version REV]
    vlprep doctor [--store DIR_OR_URI]

The workflow commands never import kfp: run / compile / submit / upload live in the pipelines package
(``vlprep_pipelines.cli``), loaded only when one of them is asked for.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from vlprep import VlprepError
from vlprep.cli import captions, context, regions, vokens, xlxmert

PIPELINE_COMMANDS = {
    "run": "run a pipeline on this machine (kfp.local)",
    "compile": "compile pipelines to KFP IR YAML",
    "submit": "submit a pipeline run to a KFP cluster",
    "upload": "publish pipelines to a KFP cluster's UI as versions of named pipelines",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlprep", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in PIPELINE_COMMANDS.items():  # listed for --help; main() hands them to vlprep_pipelines
        sub.add_parser(name, help=text, add_help=False)
    for workflow in (captions, regions, context, xlxmert, vokens):
        workflow.add(sub)
    from vlprep import doctor

    doctor.add_cli(sub)  # vlprep doctor [--store URI]: the images' health check
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if argv and argv[0] in PIPELINE_COMMANDS:
        from vlprep_pipelines.cli import main as pipelines_main

        return pipelines_main(argv)
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except VlprepError as e:
        print(f"vlprep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlprep: interrupted; rerun the same command to resume (finished shards are kept)", file=sys.stderr)
        return 130
    except OSError as e:
        reason = os_error(e)
        if reason is None:
            raise
        print(f"vlprep: error: {reason}", file=sys.stderr)
        return 2


def os_error(e: OSError) -> str | None:
    """One line for a filesystem error the user can fix (disk full, read-only, a file where a folder
    goes); None for others, which keep their traceback."""
    where = e.filename or "the output"
    if e.errno == errno.ENOSPC:
        return f"disk full writing {where}: free space on that filesystem (or use another --out), then rerun"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where} is not writable ({e.strerror}); use a writable --out"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{where}: a file stands where a folder is needed ({e.strerror}); remove it or use another --out"
    return None
