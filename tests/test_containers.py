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
from kfp_harness import REPO, DockerRun, load, open_to_all, run_component, run_in_subprocess
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


class Chain:
    """Components of one compiled pipeline run in order through one runner; records every output."""

    def __init__(self, pipeline: str, runner, root: Path):
        self.spec, self.runner, self.root = load(pipeline)[0], runner, root
        self.steps: list[tuple[str, dict, dict]] = []

    def __call__(self, component: str, **params):
        workdir = self.root / "work" / f"{len(self.steps):02d}-{component}"
        values, artifacts = run_component(self.spec, component, params, workdir, self.runner)
        files = {n: without_timings(Path(p).read_bytes()) for n, p in artifacts.items() if Path(p).is_file()}
        self.steps.append((component, values, files))
        return values.get("Output")


def region_features_chain(c: Chain, sample: Path, store: str) -> None:
    """Every captions and regions component, as region_features chains them (tiny detector)."""
    karpathy, ids, annotations = str(sample / "dataset_coco.json"), str(sample / "test1k_ids.txt"), f"{store}/annotations"
    shards = c("captions-plan", karpathy=karpathy, dataset="coco", out=annotations, num_shards=2)
    done = [c("captions-extract", spec=s, karpathy=karpathy, dataset="coco", test1k_ids=ids) for s in shards]
    c("captions-merge", shards=done, dataset="coco", out=annotations, test1k_ids=ids)
    shards = c("regions-plan", images=str(sample / "images"), out=store, num_shards=2, image_root="")
    done = [c("regions-extract", spec=s, dataset="coco", recipe="caffe36", weights="random:0", device="cpu",
              batch_size=4, num_workers=0, arch="tiny", recipe_params={}, autocast="") for s in shards]
    merged = c("regions-merge", shards=done, out=store, dataset="coco", recipe="caffe36",
               formats="volta-tsv,lxmert-tsv,h5", recipe_params={}, vocab_objects="", vocab_attributes="")
    c("regions-lmdb", merged=merged, out=store, dataset="coco", recipe="caffe36")
    c("regions-hard-negatives", merged=merged, out=store, annotations=annotations, dataset="coco")


def crossmodal_context_chain(c: Chain, sample: Path, store: str) -> None:
    """Every context component, as crossmodal_context chains them (tiny CLIP, exact index)."""
    phrases = c("context-plan", attributes=str(sample / "vg/attributes.json"),
                relationships=str(sample / "vg/relationships.json"), out=store, recipe="xmodal-ctx",
                weights="random:0", text_weights="", model_cfg="tiny", index="flat", topk="", attribute_leak=True,
                phrase_shards=2, image_batch=2, text_batch=32, encode_batch=256)
    images = c("context-plan-images", phrase_shards=phrases, images=str(sample / "images"), out=store,
               image_shards=2, image_root="")
    encoded = [c("context-encode-phrases", spec=s, device="cpu") for s in phrases]
    index = c("context-index", shards=encoded, out=store)
    encoded = [c("context-encode-images", spec=s, device="cpu", num_workers=0) for s in images]
    plan = c("context-retrieve-plan", images=encoded, index=index, out=store)
    retrieved = [c("context-retrieve", spec=s, device="cpu") for s in plan]
    c("context-merge", shards=retrieved, out=store)


CHAINS = {"region_features": region_features_chain, "crossmodal_context": crossmodal_context_chain}


def comparable(value, *roots):
    """``value`` with each of ``roots`` written as <0>, <1>..., without what records where and when it
    ran: timings (keys naming seconds) and the interpreter's package versions (done-markers keep both)."""
    if isinstance(value, dict):
        return {comparable(k, *roots): comparable(v, *roots) for k, v in value.items()
                if "seconds" not in k and k != "versions"}
    if isinstance(value, list):
        return [comparable(v, *roots) for v in value]
    if isinstance(value, str | bytes):
        for i, root in enumerate(roots):
            old, new = str(root), f"<{i}>"
            value = value.replace(old, new) if isinstance(value, str) else value.replace(old.encode(), new.encode())
    return value


def without_timings(report: bytes) -> bytes:
    """A report with its measured numbers (decimals, percentages: images/s, share of time) masked."""
    return re.sub(rb"\d+(\.\d+)?%|\d+\.\d+", b"<n>", report)


def content(name: str, data: bytes):
    """What must be equal in a stored file: its bytes; a .json file's document; an HTML report without
    its timings; nothing of LMDB's lock.mdb (its reader table: process state, not data)."""
    if name.endswith("lock.mdb"):
        return None
    if name.endswith(".json"):
        return json.loads(data)
    return without_timings(data) if name.endswith(".html") else data


def tree(root: Path) -> dict:
    """{name relative to ``root``: content} of every file under ``root``."""
    return {str(p.relative_to(root)): content(p.name, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("pipeline", sorted(CHAINS))
def test_each_component_in_its_image_equals_the_subprocess_run(pipeline, tmp_path, sample, stage_images):
    """Same compiled command, same executor input: the image gives what this interpreter gives."""
    runs = {}
    for name, runner in (("subprocess", run_in_subprocess),
                         ("docker", DockerRun(writable=[tmp_path / "docker"], readonly=[sample]))):
        root = tmp_path / name
        chain = Chain(pipeline, runner, root)
        CHAINS[pipeline](chain, sample, str(root / "store"))
        runs[name] = (root, chain.steps)
    (sub_root, sub_steps), (docker_root, docker_steps) = runs["subprocess"], runs["docker"]
    assert [s[0] for s in docker_steps] == [s[0] for s in sub_steps]
    for (component, values, files), (_, sub_values, sub_files) in zip(docker_steps, sub_steps, strict=True):
        assert comparable(values, docker_root) == comparable(sub_values, sub_root), component
        assert comparable(files, docker_root) == comparable(sub_files, sub_root), component
    ours, theirs = tree(docker_root / "store"), tree(sub_root / "store")
    assert sorted(ours) == sorted(theirs)
    differ = [name for name in ours if comparable(ours[name], docker_root) != comparable(theirs[name], sub_root)]
    assert differ == []


def test_an_image_missing_a_dependency_fails_its_component(tmp_path, sample, stage_images, docker_client):
    """A regions image without h5py: the components that do not need it run, regions-merge fails."""
    broken = "vlprep-test/regions-without-h5py:broken"
    dockerfile = f"FROM {stage_images['regions']}\nUSER root\nRUN pip uninstall -y h5py\nUSER 1000:1000\n"
    docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=broken, rm=True)
    try:
        real = DockerRun(writable=[tmp_path], readonly=[sample])

        def in_broken_image(image, command, args):
            return real(broken, command, args)

        spec, store = load("region_features")[0], str(tmp_path / "store")
        shards, _ = run_component(spec, "regions-plan", {"images": str(sample / "images"), "out": store,
                                                          "num_shards": 1, "image_root": ""},
                                  tmp_path / "plan", in_broken_image)
        done, _ = run_component(spec, "regions-extract", {
            "spec": shards["Output"][0], "dataset": "coco", "recipe": "caffe36", "weights": "random:0",
            "device": "cpu", "batch_size": 4, "num_workers": 0, "arch": "tiny", "recipe_params": {},
            "autocast": ""}, tmp_path / "extract", in_broken_image)
        merge = {"shards": [done["Output"]], "out": store, "dataset": "coco", "recipe": "caffe36",
                 "formats": "volta-tsv", "recipe_params": {}, "vocab_objects": "", "vocab_attributes": ""}
        with pytest.raises(AssertionError, match="ModuleNotFoundError: No module named 'h5py'"):
            run_component(spec, "regions-merge", merge, tmp_path / "merge-broken", in_broken_image)
        values, _ = run_component(spec, "regions-merge", merge, tmp_path / "merge", real)
        assert values["Output"]["images"] == 6
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
    assert {"mscoco/trainval_feat.lmdb/data.mdb", "mscoco/hard_negative.pkl", "xmodal_ctx/image_features/vis_ctx.hdf5",
            "mscoco/annotations/train_ann.jsonl"} <= set(local_files)
    # the outputs: the same content, where they name a file, gs:// there and a local path here; the
    # _work records also hold digests of those names: they are compared by name only, above
    outputs = [n for n in local_files if "/_work/" not in f"/{n}"]
    differ = [n for n in outputs if comparable(gcs_files[n], f"{gcs}/run", f"{gcs}/sample")
              != comparable(local_files[n], tmp_path / "local", sample)]
    assert differ == []
