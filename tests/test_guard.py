"""Arguments checked before work, who holds an output, leftovers of killed runs, checks before compute.

Row numbers are those of ../shared/reviews/hostile-inputs.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlprep import VlprepError, stage
from vlprep.cli import main
from vlprep.stages.regions.settings import VOLTA_DIR

SRC = str(Path(__file__).resolve().parents[1] / "src")


def one_error_line(capsys, rc: int) -> str:
    """The run failed with exit 2 and its last stderr line is the error; no traceback anywhere."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vlprep") and ": error: " in last, err
    return last


def run_cli(capsys, argv: list[str]) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse refuses with exit 2 after printing its one error line
        rc = e.code
    return one_error_line(capsys, rc)


# ------------------------------------------------------------------ 4.1, 4.2, 4.3, 4.9: numbers and options


def _commands(tmp: Path) -> dict[str, list[str]]:
    """Each workflow command with its required options (values that parse; nothing runs before the error)."""
    f = str(tmp / "f")
    return {
        "captions": ["captions", "--karpathy", f, "--dataset", "coco", "--out", f],
        "regions": ["regions", "extract", "--images", f, "--out", f],
        "context": ["context", "run", "--images", f, "--attributes", f, "--relationships", f, "--out", f],
        "xlxmert": ["xlxmert", "extract", "--images", f, "--weights", "random:0", "--out", f],
        "kmeans": ["xlxmert", "kmeans", "--out", f],
        "tokenize": ["vokens", "tokenize", "--corpus", f, "--tokenizer", f, "--out", f],
        "keys": ["vokens", "keys", "--images", f, "--set", "s", "--matcher", "random:0", "--out", f],
        "vokenize": ["vokens", "vokenize", "--tokens", f, "--matcher", "random:0", "--keys", f, "--out", f],
        "train": ["vokens", "train", "--train", f, "--valid", f, "--image-root", f, "--out", f],
    }


BAD_ARGUMENTS = [
    ("captions", ["--shards", "0"], "must be 1 or more"),
    ("regions", ["--shards", "-3"], "must be 1 or more"),
    ("regions", ["--batch-size", "0"], "must be 1 or more"),
    ("regions", ["--batch-size", "-1"], "must be 1 or more"),
    ("regions", ["--workers", "-1"], "must be 0 or more"),
    ("regions", ["--device", "tpu"], "device 'tpu'"),
    ("regions", ["--recipe-params", "{nms:"], "not valid JSON"),
    ("regions", ["--recipe-params", "[1,2]"], "give a JSON object"),
    ("regions", ["--shards", "two"], "not an integer"),
    ("context", ["--image-shards", "0"], "must be 1 or more"),
    ("context", ["--phrase-shards", "-1"], "must be 1 or more"),
    ("context", ["--image-batch", "-2"], "must be 0 or more"),
    ("context", ["--device", "tpu"], "device 'tpu'"),
    ("xlxmert", ["--shards", "0"], "must be 1 or more"),
    ("xlxmert", ["--imsize", "-32"], "must be 0 or more"),
    ("xlxmert", ["--device", "gpu"], "device 'gpu'"),
    ("kmeans", ["--n-centroids", "0"], "must be 1 or more"),
    ("kmeans", ["--device", "tpu"], "device 'tpu'"),
    ("tokenize", ["--block-lines", "0"], "must be 1 or more"),
    ("tokenize", ["--shards", "0"], "must be 1 or more"),
    ("keys", ["--batch-size", "0"], "must be 1 or more"),
    ("keys", ["--workers", "-1"], "must be 0 or more"),
    ("vokenize", ["--topk", "0"], "must be 1 or more"),
    ("vokenize", ["--device", "tpu"], "device 'tpu'"),
    ("train", ["--epochs", "-1"], "must be 0 or more"),
    ("train", ["--lr", "nan"], "finite number"),
    ("train", ["--nproc", "0"], "must be 1 or more"),
]


@pytest.mark.parametrize(("command", "extra", "says"), BAD_ARGUMENTS,
                         ids=[f"{c}{' '.join(e)}" for c, e, _ in BAD_ARGUMENTS])
def test_rows_4_1_4_2_4_3_4_9_bad_numbers_and_options_refused_by_argparse(tmp_path, capsys, command, extra, says):
    line = run_cli(capsys, _commands(tmp_path)[command] + extra)
    assert says in line
    assert not (tmp_path / "f").exists()  # nothing was written


def test_row_4_9_cuda_without_a_gpu_stops_before_planning(tmp_path, capsys, sample):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid here")
    out = tmp_path / "o"
    line = run_cli(capsys, ["regions", "extract", "--images", str(sample / "images"), "--out", str(out),
                            "--arch", "tiny", "--device", "cuda"])
    assert "no CUDA GPU" in line
    assert not out.exists()


def test_runtime_refuses_bad_values_on_the_component_path():
    for kwargs in ({"device": "tpu"}, {"batch_size": 0}, {"batch_size": -1}, {"num_workers": -1},
                   {"batch_size": 2.5}):
        with pytest.raises(VlprepError):
            stage.Runtime(**kwargs)
    assert stage.Runtime(device="cuda:1", batch_size=1, num_workers=0).device == "cuda:1"


def test_row_4_1_zero_shards_refused_on_the_component_path(tmp_path, sample):
    from vlprep.stages import captions

    settings = captions.Settings(karpathy=str(sample / "dataset_coco.json"))
    for n in (0, -3):
        with pytest.raises(VlprepError, match="give 1 or more"):
            captions.plan(str(tmp_path / "o"), settings, num_shards=n)


# ------------------------------------------------------------------ 4.5, 4.6: recipe parameters


@pytest.mark.parametrize(("recipe", "params", "says"), [
    ("caffe36", {"nms_thresh": "high"}, "nms_thresh='high' must be float"),
    ("caffe36", {"conf_thresh": True}, "must be float"),
    ("caffe10-100", {"min_boxes": 50, "max_boxes": 5}, "50 to 5 boxes"),
    ("caffe10-100", {"max_boxes": -1}, "must be >= 0"),
])
def test_rows_4_5_4_6_recipe_parameters_refused_before_work(tmp_path, capsys, sample, recipe, params, says):
    out = tmp_path / "o"
    line = run_cli(capsys, ["regions", "extract", "--images", str(sample / "images"), "--out", str(out), "--arch",
                            "tiny", "--weights", "random:0", "--recipe", recipe, "--recipe-params", json.dumps(params)])
    assert says in line
    assert not out.exists()


def test_recipe_overrides_of_the_right_type_are_kept():
    from vlprep.models.detection.selection import get_recipe

    recipe = get_recipe("caffe10-100", min_boxes=5, max_boxes=50, nms_thresh=0.5, conf_thresh=1)
    assert (recipe.box_range, recipe.nms_thresh, recipe.conf_thresh) == ((5, 50), 0.5, 1)


# ------------------------------------------------------------------ 4.10, 4.11, 4.12: where outputs go


def test_row_4_10_out_that_is_a_file_is_refused(tmp_path, capsys, sample):
    out = tmp_path / "taken"
    out.write_text("x")
    line = run_cli(capsys, ["captions", "--karpathy", str(sample / "dataset_coco.json"), "--dataset", "coco",
                            "--out", str(out)])
    assert "is a file" in line and out.read_text() == "x"


def test_os_errors_become_one_line():
    import errno

    from vlprep.cli import os_error

    assert "disk full writing /x/a.tsv" in os_error(OSError(errno.ENOSPC, "No space left on device", "/x/a.tsv"))
    assert "/x is not writable" in os_error(OSError(errno.EROFS, "Read-only file system", "/x"))
    assert "a file stands where a folder" in os_error(NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/y"))
    assert os_error(OSError(errno.EIO, "I/O error")) is None  # not ours to explain: traceback kept


def _in_private_mount(tmp_path: Path, mount: str, cli: list[str]) -> subprocess.CompletedProcess:
    """``cli`` run by a fresh Python inside a private mount namespace where ``mount`` (a shell snippet)
    prepared ``$M``; skipped where unshare cannot make one (not root, no user namespaces)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare -m to mount a private tmpfs")
    m = tmp_path / "m"
    m.mkdir()
    code = f"import sys; sys.path.insert(0, {SRC!r}); from vlprep.cli import main; sys.exit(main({cli!r}))"
    # after the run, list any temp file it left (the tmpfs goes with the namespace)
    script = f'set -e; M={m}; {mount}; set +e; {sys.executable} -c "$0"; rc=$?; find $M -name ".tmp-*"; exit $rc'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, code], capture_output=True, text=True, timeout=300)
    if "mount:" in proc.stderr and "permission denied" in proc.stderr.lower():
        pytest.skip(f"mounting a tmpfs is not allowed here: {proc.stderr.strip()}")
    return proc


def _assert_one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert ".tmp-" not in proc.stdout  # nothing half-written left behind
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vlprep: error: "), proc.stderr
    return last


@pytest.mark.parametrize("command", ["captions", "regions", "phrases"])
def test_row_4_11_read_only_output_folder_is_one_line(tmp_path, sample, command):
    out = str(tmp_path / "m" / "o")
    cli = {
        "captions": ["captions", "--karpathy", str(sample / "dataset_coco.json"), "--dataset", "coco", "--out", out],
        "regions": ["regions", "extract", "--images", str(sample / "images"), "--out", out, "--arch", "tiny",
                    "--weights", "random:0", "--workers", "0"],
        "phrases": ["context", "phrases", "--attributes", str(sample / "vg" / "attributes.json"),
                    "--relationships", str(sample / "vg" / "relationships.json"), "--out", out + "/phrases.txt"],
    }[command]
    proc = _in_private_mount(tmp_path, "mount -t tmpfs -o size=1m tmpfs $M; mount -o remount,ro $M", cli)
    assert "not writable" in _assert_one_line(proc)


def test_row_4_12_disk_full_is_one_line_and_leaves_nothing_half_written(tmp_path, sample):
    out = str(tmp_path / "m" / "o")
    cli = ["captions", "--karpathy", str(sample / "dataset_coco.json"), "--dataset", "coco", "--out", out]
    fill = "mount -t tmpfs -o size=64k tmpfs $M; dd if=/dev/zero of=$M/fill bs=1k count=200 2>/dev/null || true"
    proc = _in_private_mount(tmp_path, fill, cli)
    assert "disk full" in _assert_one_line(proc)


def test_row_4_12_disk_full_during_the_run_is_one_line(tmp_path, sample):
    """The probe fits, the outputs do not: the write that fails names its file."""
    out = str(tmp_path / "m" / "o")
    cli = ["captions", "--karpathy", str(sample / "dataset_coco.json"), "--dataset", "coco", "--out", out]
    fill = ("mount -t tmpfs -o size=64k tmpfs $M; dd if=/dev/zero of=$M/fill bs=1k count=200 2>/dev/null || true; "
            "rm -f $M/fill; dd if=/dev/zero of=$M/fill bs=1k count=52 2>/dev/null")
    proc = _in_private_mount(tmp_path, fill, cli)
    line = _assert_one_line(proc)
    assert f"disk full writing {out}/" in line


# ------------------------------------------------------------------ 6.1, 6.2: who holds an output

HOLDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from vlprep.stages import regions
    settings = regions.Settings(images=sys.argv[3], arch="tiny", weights=sys.argv[4])
    specs = regions.plan(sys.argv[2], settings, num_shards=2)
    print(__import__("json").dumps(specs), flush=True)
    if sys.argv[5] == "hold":
        sys.stdin.readline()
""")


def _other_run(out: Path, images: Path, weights: str, hold: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, SRC, str(out), str(images), weights,
                             "hold" if hold else "exit"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_row_6_2_second_run_with_other_weights_is_refused_while_the_first_holds(tmp_path, capsys, sample):
    from vlprep.stages import regions

    out, images = tmp_path / "o", sample / "images"
    first = _other_run(out, images, "random:0", hold=True)
    try:
        assert json.loads(first.stdout.readline())  # the first run has planned and is working
        line = run_cli(capsys, ["regions", "extract", "--images", str(images), "--out", str(out), "--arch", "tiny",
                                "--weights", "random:1", "--workers", "0"])
        assert "held by run" in line and f"pid {first.pid}" in line and "other settings" in line
        assert not list((out / "_work" / "regions").glob("*.done.json"))  # nothing extracted
        # row 6.1: the same settings share the output
        regions.plan(str(out), regions.Settings(images=str(images), arch="tiny", weights="random:0"), num_shards=2)
    finally:
        first.communicate("\n", timeout=60)
    # the first run is gone: other settings may take the output now
    regions.plan(str(out), regions.Settings(images=str(images), arch="tiny", weights="random:1"), num_shards=2)


def test_row_6_2_a_run_taken_over_publishes_nothing(tmp_path, sample):
    """Run A plans and extracts a shard; its lease lapses (a holder on another host, not refreshed) and
    run B with other weights plans; A's next shard and A's merge are refused, not published."""
    from vlprep.stages import regions

    out, images = tmp_path / "o", sample / "images" / "val2014"
    specs_a = regions.plan(str(out), regions.Settings(images=str(images), arch="tiny", weights="random:0"),
                           num_shards=2)
    regions.extract(specs_a[0], stage.Runtime(num_workers=0))
    held = out / "_work" / "regions" / "holder.json"
    held.write_text(json.dumps({**json.loads(held.read_text()), "host": "elsewhere", "refreshed": 0}))
    second = _other_run(out, images, "random:1", hold=False)
    specs_b = json.loads(second.communicate(timeout=120)[0])
    assert specs_b[0]["run"] != specs_a[0]["run"]
    with pytest.raises(VlprepError, match="taken over by run"):
        regions.extract(specs_a[1], stage.Runtime(num_workers=0))
    assert not (out / "_work" / "regions" / "shard-00001-of-00002.done.json").exists()
    with pytest.raises(VlprepError, match="taken over by run"):
        regions.merge(str(out))
    assert not (out / VOLTA_DIR).exists() and not (out / "lxmert").exists()


# ------------------------------------------------------------------ 11 (2.3-2.8): leftovers of killed runs

KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from vlprep.storage import LocalBuild
    out = sys.argv[2]
    part = LocalBuild(out + "/_work/regions/shard-00001-of-00003/images.jsonl")
    open(part.tmp, "wb").write(b"half")
    tsv = LocalBuild(out + "/volta/val2014_obj36-36.tsv")
    open(tsv.tmp, "wb").write(b"half")
    lmdb = LocalBuild(out + "/trainval_feat.lmdb", directory=True)
    open(lmdb.tmp / "data.mdb", "wb").write(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_row_11_leftovers_of_a_killed_run_are_removed_by_the_next_plan(tmp_path, sample):
    from vlprep.stages import regions
    from vlprep.storage import LocalBuild
    from vlprep.storage.local import LEFTOVER_GRACE_S

    out = tmp_path / "o"
    killed = subprocess.run([sys.executable, "-c", KILLED, SRC, str(out)], timeout=60)
    assert killed.returncode == -9
    left = sorted(p.name for p in out.rglob(".tmp-*"))
    assert len(left) == 3
    live = LocalBuild(out / "volta" / "being_written.tsv")  # a live writer's temp (this process)
    live.tmp.write_bytes(b"busy")
    old = out / ".tmp-weights-abc"  # no writer in its name: removed once older than the grace period
    old.write_bytes(b"x")
    os.utime(old, (0, 0))
    young = out / ".tmp-download-def"
    young.write_bytes(b"x")
    assert LEFTOVER_GRACE_S > 60

    regions.plan(str(out), regions.Settings(images=str(sample / "images"), arch="tiny"), num_shards=3)
    assert sorted(p.name for p in out.rglob(".tmp-*")) == sorted([live.tmp.name, young.name])
    live.discard()


# ------------------------------------------------------------------ check before computing


def test_non_coco_names_refused_before_any_image_is_decoded(tmp_path, capsys, sample):
    folder = tmp_path / "pets"
    folder.mkdir()
    for name in ("cat.jpg", "dog.jpg"):
        shutil.copy(next((sample / "images" / "val2014").glob("*.jpg")), folder / name)
    out = tmp_path / "o"
    line = run_cli(capsys, ["regions", "extract", "--images", str(folder), "--out", str(out), "--arch", "tiny",
                            "--weights", "random:0", "--workers", "0"])
    assert "2 of 2 images do not fit the coco id rule" in line and "cat.jpg" in line and "--no-lmdb" in line
    assert not (out / "_work" / "regions" / "plan.json").exists()


def test_id_rule_without_lmdb_accepts_any_coco_name_and_flickr_needs_numbers(tmp_path):
    from vlprep.stages.regions import Settings
    from vlprep.stages.regions.extract import check_ids

    check_ids(["/x/pets/cat.jpg"], Settings(images="x", lmdb=False))
    with pytest.raises(VlprepError, match="Flickr30k names are numeric"):
        check_ids(["/x/f/123.jpg", "/x/f/cat.jpg"], Settings(images="x", dataset="flickr30k", lmdb=False))


@pytest.mark.parametrize(("weights", "says"), [
    ("gs://", "names no bucket"),
    ("gs:/bucket/model.pkl", "not a URL"),
    ("https:///model.pkl", "names no host"),
    ("random:abc", "random:<integer seed>"),
    ("missing.pkl", "file not found"),
])
def test_weights_spec_checked_at_plan(tmp_path, capsys, sample, weights, says):
    out = tmp_path / "o"
    line = run_cli(capsys, ["regions", "extract", "--images", str(sample / "images"), "--out", str(out), "--arch",
                            "tiny", "--weights", weights])
    assert says in line
    assert not out.exists()


def test_ctrl_c_ends_in_one_line_and_resumes(tmp_path, sample):
    """^C (SIGINT to the process group, as a terminal sends it) during extraction: one line saying how to
    resume, exit 130, no traceback."""
    import signal
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vlprep.cli", "regions", "extract", "--images", str(sample / "images"), "--out",
           str(out), "--arch", "tiny", "--weights", "random:0", "--workers", "0", "--shards", "3", "--no-lmdb"]
    # SIGINT as a terminal leaves it: a background job (CI started with &) inherits it ignored
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": SRC},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    plan = out / "_work" / "regions" / "plan.json"
    deadline = time.time() + 120
    while not plan.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert plan.exists(), "the run never planned"
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("vlprep: interrupted; rerun the same command to resume")
