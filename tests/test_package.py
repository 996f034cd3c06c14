"""The library stays importable without kfp: components and pipelines are layers over it."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import vlprep


def test_library_never_imports_kfp():
    modules = [m.name for m in pkgutil.walk_packages(vlprep.__path__, "vlprep.")]
    assert "vlprep.stages.captions" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'kfp' or m.startswith('kfp.'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_workflow_commands_never_import_kfp(tmp_path):
    """`vlprep captions|regions|context` run without kfp; only run / compile / submit load the pipelines."""
    from vlprep.sample import sample_dir

    code = (
        "import sys\n"
        "from vlprep.cli import main\n"
        f"rc = main(['captions', '--karpathy', {sample_dir() + '/dataset_coco.json'!r}, '--dataset', 'coco',"
        f" '--out', {str(tmp_path)!r}])\n"
        "bad = sorted(m for m in sys.modules if m == 'kfp' or m.startswith(('kfp.', 'vlprep_pipelines')))\n"
        "assert rc == 0 and not bad, (rc, bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "train_ann.jsonl").exists()
