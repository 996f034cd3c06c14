"""Components in their real images (Docker): what a cluster runs, checked on this machine.

Run by `make test-containers` (after `make images`), never by `make test`: they need a Docker
engine and fail, not skip, when there is none.
"""

from __future__ import annotations

import builtins
import io
import json
import re
import time
import tomllib
import warnings
from pathlib import Path

import pytest
from chains import CHAINS, Chain
from kfp_harness import REPO, DockerRun, open_to_all, run_in_subprocess
from vlprep_components import config

pytestmark = pytest.mark.containers

# what each stage image must import (the captions image must not have torch at all)
STAGE_IMPORTS = {
    "captions": ["vlprep.stages.captions", "kfp"],
    "regions": ["vlprep.stages.regions", "torch", "torchvision", "h5py", "faiss", "lmdb"],
    "context": ["vlprep.stages.context", "torch", "torchvision", "h5py", "faiss", "open_clip"],
    "xlxmert": ["torch", "torchvision", "h5py", "faiss"],
    "vokens": ["torch", "torchvision", "h5py", "faiss", "transformers", "tokenizers"],
}


@pytest.fixture(scope="session")
def docker_client():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:  # no socket, engine down, no permission
        pytest.fail(f"no Docker engine answers ({type(e).__name__}: {e}); `make test-containers` starts one "
                    "(images/docker-engine.sh)")
    return client


@pytest.fixture(scope="session")
def stage_images(docker_client) -> dict[str, str]:
    """{stage: image} as the compiled pipelines name them; every one must be built (`make images`)."""
    import docker

    missing = []
    for image in config.IMAGES.values():
        try:
            docker_client.images.get(image)
        except docker.errors.ImageNotFound:
            missing.append(image)
    if missing:
        pytest.fail(f"images not built: {', '.join(missing)}; run `make images`")
    return dict(config.IMAGES)


# ---------------------------------------------------------------- the images themselves


@pytest.mark.parametrize("stage", config.STAGES)
def test_stage_image_is_labelled_non_root_and_healthy(stage, stage_images, docker_client, gcs_emulator):
    image = stage_images[stage]
    attrs = docker_client.images.get(image).attrs["Config"]
    labels = attrs["Labels"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == version
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", labels["org.opencontainers.image.revision"])
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert attrs["User"] == "1000:1000"
    assert attrs["Healthcheck"]["Test"] == ["CMD", "vlprep", "doctor"]

    # the health command, against the object store as a pod reaches GCS
    run = DockerRun(writable=[], env={"STORAGE_EMULATOR_HOST": gcs_emulator, "GOOGLE_CLOUD_PROJECT": "test"},
                    network_mode="host")
    code, out = run(image, ["vlprep", "doctor", "--store", "gs://vlprep-test/doctor"], [])
    assert code == 0 and "store gs://vlprep-test/doctor: ok" in out, out
    assert ("\ntorch 2." in out) == (stage != "captions"), out
    code, out = run(image, ["vlprep", "doctor", "--store", "gs://no-such-bucket/doctor"], [])
    assert code == 1 and "does not exist" in out, out
    code, out = run(image, ["python3", "-c", f"import {', '.join(STAGE_IMPORTS[stage])}"], [])
    assert code == 0, out
    if stage == "captions":
        code, out = run(image, ["python3", "-c", "import torch"], [])
        assert code == 1 and "No module named 'torch'" in out
    assert health(docker_client, image, attrs["Healthcheck"]["Test"]) == "healthy"


def health(client, image: str, test: list) -> str:
    """The status Docker gives a container of ``image`` running ``test`` as its health check (every second
    here instead of the image's minute)."""
    container = client.containers.run(image, ["sleep", "600"], detach=True, healthcheck={
        "test": test, "interval": 1_000_000_000, "timeout": 120_000_000_000, "retries": 3})
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            container.reload()
            status = container.attrs["State"]["Health"]["Status"]
            if status != "starting":
                return status
            time.sleep(1)
        return "starting"
    finally:
        container.remove(force=True)


# ---------------------------------------------------------------- each component in its image


# keys of the records that name where and when a run happened, not what it made: digests of settings
# that hold the output's root (fingerprint) and of shard parts whose zip records its write time (sha256),
# the interpreter's package versions, and which run held the output (the specs' run id; holder.json)
RUN_RECORD_KEYS = {"fingerprint", "sha256", "versions", "run", "host", "pid", "started", "refreshed"}


def timing(key: str) -> bool:
    """Whether a record's ``key`` holds a measured time or rate (``extract_seconds``, ``lines_per_second``)."""
    return "seconds" in key or key.endswith("per_second")


def comparable(value, *roots):
    """``value`` with each of ``roots`` written as <0>, <1>..., without what records where and when it
    ran: timings and rates and the ``RUN_RECORD_KEYS`` (done-markers and plans keep them)."""
    if isinstance(value, dict):
        return {comparable(k, *roots): comparable(v, *roots) for k, v in value.items()
                if not timing(str(k)) and k not in RUN_RECORD_KEYS}
    if isinstance(value, list | tuple):
        return [comparable(v, *roots) for v in value]
    if isinstance(value, str | bytes):
        for i, root in enumerate(roots):
            old, new = str(root), f"<{i}>"
            value = value.replace(old, new) if isinstance(value, str) else value.replace(old.encode(), new.encode())
    return value


def without_timings(report: bytes) -> bytes:
    """A report with its measured numbers (decimals, percentages: images/s, share of time) masked."""
    return re.sub(rb"\d+(\.\d+)?%|\d+\.\d+", b"<n>", report)


def arrays(value):
    """``value`` with every tensor or array as (dtype, shape, bytes)."""
    import numpy as np
    import torch

    if isinstance(value, dict):
        return {k: arrays(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [arrays(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.numpy(force=True)
    if isinstance(value, np.ndarray):
        return str(value.dtype), value.shape, value.tobytes()
    return value


def content(name: str, data: bytes):
    """What must be equal in a stored file: its bytes; a .json file's document; an HTML report without
    its timings; an .npz file's arrays (its zip records when it was written); a torch checkpoint's
    objects (its training history holds timings); nothing of LMDB's lock.mdb (its reader table:
    process state, not data)."""
    if name.endswith("lock.mdb"):
        return None
    if name.endswith(".json"):
        return json.loads(data)
    if name.endswith(".npz"):
        import numpy as np

        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: arrays(npz[k]) for k in npz.files}
    if name.endswith(".pth"):
        import torch

        return arrays(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return without_timings(data) if name.endswith(".html") else data


def tree(root: Path) -> dict:
    """{name relative to ``root``: content} of every file under ``root``."""
    return {str(p.relative_to(root)): content(p.name, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def step_files(step) -> dict:
    """{artifact name: content without timings} of the files a step's artifacts name."""
    return {n: without_timings(Path(p).read_bytes()) for n, p in step.artifacts.items() if Path(p).is_file()}


@pytest.mark.parametrize("pipeline", sorted(CHAINS))
def test_each_component_in_its_image_equals_the_subprocess_run(pipeline, tmp_path, sample, stage_images):
    """Same compiled command, same executor input: the image gives what this interpreter gives."""
    chains = {}
    for name, runner in (("subprocess", run_in_subprocess),
                         ("docker", DockerRun(writable=[tmp_path / "docker"], readonly=[sample]))):
        chains[name] = Chain(pipeline, tmp_path / name, runner)
        CHAINS[pipeline](chains[name], sample)
    sub, docker = chains["subprocess"], chains["docker"]
    assert [s.component for s in docker.steps] == [s.component for s in sub.steps]
    for ours, theirs in zip(docker.steps, sub.steps, strict=True):
        assert comparable(ours.values, docker.root) == comparable(theirs.values, sub.root), ours.component
        assert comparable(step_files(ours), docker.root) == comparable(step_files(theirs), sub.root), ours.component
    ours, theirs = tree(docker.store), tree(sub.store)
    assert sorted(ours) == sorted(theirs)
    differ = [name for name in ours if comparable(ours[name], docker.root) != comparable(theirs[name], sub.root)]
    assert differ == []


def test_an_image_missing_a_dependency_fails_its_component(tmp_path, sample, stage_images, docker_client):
    """A regions image without h5py: plan and extract (which do not need it) run, a merge asked for the
    .h5 file fails naming the module; the real image merges the same shards."""
    broken = "vlprep-test/regions-without-h5py:broken"
    dockerfile = f"FROM {stage_images['regions']}\nUSER root\nRUN pip uninstall -y h5py\nUSER 1000:1000\n"
    docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=broken, rm=True)
    try:
        real = DockerRun(writable=[tmp_path], readonly=[sample])

        def in_broken_image(image, command, args):
            return real(broken, command, args)

        c = Chain("regions", tmp_path, in_broken_image)
        shards = c("regions-plan", images=str(sample / "images"), image_root="", dataset="coco", recipe="caffe36",
                   recipe_params={}, weights="random:0", arch="tiny", autocast="", formats="volta-tsv,h5",
                   lmdb=False, annotations="", vocab_objects="", vocab_attributes="", out=str(c.store),
                   num_shards=1, split="balanced")
        done = [c("regions-extract", spec=s, device="cpu", batch_size=4, num_workers=0) for s in shards]
        with pytest.raises(AssertionError, match="ModuleNotFoundError: No module named 'h5py'"):
            c("regions-merge", shards=done, out=str(c.store))
        c.runner = real
        assert c("regions-merge", shards=done, out=str(c.store))["images"] == 6
    finally:
        docker_client.images.remove(broken, force=True)


# ---------------------------------------------------------------- the demo pipeline, every task in its image


def run_demo(runner, params: dict, pipeline_root: Path) -> None:
    from kfp import local
    from vlprep_pipelines.demo import demo

    local.init(runner=runner, pipeline_root=str(pipeline_root), raise_on_error=True)
    original_print = builtins.print  # kfp.local indents print() per task and may leave it patched
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            demo(**params)
        finally:
            builtins.print = original_print


def test_demo_in_docker_on_gcs_equals_subprocess_on_local(tmp_path, sample, gcs, gcs_emulator, stage_images):
    """kfp.local's DockerRunner, every task in its image, reading and writing gs:// on the storage
    emulator (network_mode host, as a pod reaches GCS), gives the bytes of the local SubprocessRunner run."""
    from kfp import local
    from vlprep_pipelines import engine
    from vlprep_pipelines.demo import local_params

    from vlprep import storage

    for path in sorted(p for p in sample.rglob("*") if p.is_file()):
        storage.upload_file(path, f"{gcs}/sample/{path.relative_to(sample).as_posix()}")
    docker_root = tmp_path / "docker-root"
    open_to_all(docker_root)  # the tasks write their outputs here as the images' user
    runner = local.DockerRunner(network_mode="host",
                                environment={"STORAGE_EMULATOR_HOST": gcs_emulator, "GOOGLE_CLOUD_PROJECT": "test"})
    run_demo(runner, {**local_params(f"{gcs}/sample", f"{gcs}/run"), "arch": "tiny"}, docker_root)
    engine.run_local("demo", {**local_params(str(sample), str(tmp_path / "local")), "arch": "tiny"},
                     tmp_path / "subprocess-root")

    local_files = tree(tmp_path / "local")
    gcs_files = {uri.removeprefix(f"{gcs}/run/"): content(uri, storage.read_bytes(uri))
                 for uri in storage.list_prefix(f"{gcs}/run")}
    assert sorted(gcs_files) == sorted(local_files)
    assert {"mscoco/resnet101_faster_rcnn_genome_imgfeats/volta/trainval_feat.lmdb/data.mdb",
            "mscoco/hard_negative.pkl", "xmodal_ctx/vis_ctx.hdf5",
            "mscoco/annotations/train_ann.jsonl", "xlxmert/COCO/features/maskrcnn_valid_boxes36.h5",
            "xlxmert/clustering/maskrcnn_mscoco_train_centroids16_iter20_d32_grid8.npy",
            "vokens/vokens/valid.pkl.txt.coco_sample.6"} <= set(local_files)
    # the outputs: the same content, where they name a file, gs:// there and a local path here; the
    # _work records also hold digests of those names: they are compared by name only, above
    outputs = [n for n in local_files if "/_work/" not in f"/{n}"]
    differ = [n for n in outputs if comparable(gcs_files[n], f"{gcs}/run", f"{gcs}/sample")
              != comparable(local_files[n], tmp_path / "local", sample)]
    assert differ == []
