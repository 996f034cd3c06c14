"""`vlprep doctor`: versions, devices, a store probe; and the CLI and captions stage without torch."""

from __future__ import annotations

import subprocess
import sys

from vlprep import storage
from vlprep.cli import main


def test_doctor_on_a_temp_store(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "vlprep 0.1.0" in out and "kfp 2.17.0" in out and "device cpu" in out
    assert ": ok (write, read back, delete)" in out


def test_doctor_fails_on_a_store_it_cannot_write(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    store = str(tmp_path / "file" / "store")
    assert main(["doctor", "--store", store]) == 1
    out = capsys.readouterr().out
    assert f"store {store}: FAILED" in out and "not reachable" in out


def test_doctor_on_gcs_leaves_nothing_behind(gcs, capsys):
    storage.write_text(f"{gcs}/keep.txt", "kept")
    assert main(["doctor", "--store", gcs]) == 0
    assert storage.list_prefix(gcs) == [f"{gcs}/keep.txt"]
    assert main(["doctor", "--store", "gs://no-such-bucket/x"]) == 1
    assert "bucket gs://no-such-bucket does not exist" in capsys.readouterr().out


def test_cli_doctor_and_captions_need_no_torch(tmp_path, sample):
    # torch stays unimported even where it is installed; and where it is not (the captions image),
    # the CLI, doctor and the captions stage still run
    code = (
        "import sys\n"
        "import vlprep.cli, vlprep.doctor, vlprep.stages.captions\n"
        "vlprep.cli.parser()\n"
        "assert 'torch' not in sys.modules, 'imported torch'\n"
        "sys.modules['torch'] = None\n"
        "from vlprep.stages import captions\n"
        f"captions.run({str(tmp_path)!r}, captions.Settings(karpathy={str(sample / 'dataset_coco.json')!r}))\n"
        "sys.exit(vlprep.cli.main(['doctor']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torch is not installed here" in r.stdout
    assert (tmp_path / "train_ann.jsonl").exists()
