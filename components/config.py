"""The one place that says which image and which resources each component gets.

Images follow one rule: a component runs in the image of its stage, the stage being the components
module that defines it (components/regions.py -> vlprep-regions, built from the ``regions`` target of
images/Dockerfile). A new image tag is one edit here, or ``VLPREP_IMAGE_REGISTRY`` /
``VLPREP_IMAGE_TAG`` at compile time (``make compile IMAGE_REGISTRY=... TAG=...``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

REGISTRY = os.environ.get("VLPREP_IMAGE_REGISTRY", "ghcr.io/vlprep")
TAG = os.environ.get("VLPREP_IMAGE_TAG", "0.1.0")

# one image per stage: images/Dockerfile has a target of each name, `make images` builds them all
STAGES = ("captions", "regions", "context", "xlxmert", "vokens")
IMAGES = {stage: f"{REGISTRY}/vlprep-{stage}:{TAG}" for stage in STAGES}

GPU_TYPE = "nvidia.com/gpu"
PARALLELISM = 8  # pods at once per fan-out (ParallelFor); a literal: KFP needs it at compile time


@dataclass(frozen=True)
class Resources:
    cpu: str
    memory: str
    gpus: int = 0
    retries: int = 2


# component name (= its function's name, ``<stage>_<stage function>``) -> resources
# (requests == limits: predictable scheduling)
COMPONENTS = {
    "captions_plan": Resources(cpu="1", memory="2Gi"),
    "captions_extract": Resources(cpu="1", memory="2Gi"),
    "captions_merge": Resources(cpu="1", memory="2Gi"),
    "regions_plan": Resources(cpu="1", memory="2Gi"),
    "regions_extract": Resources(cpu="8", memory="32Gi", gpus=1),
    "regions_merge": Resources(cpu="2", memory="8Gi"),
    "regions_lmdb": Resources(cpu="2", memory="8Gi"),
    "regions_hard_negatives": Resources(cpu="4", memory="32Gi"),
    # cross-modal context (Xmodal-Ctx / HAAV)
    "context_plan": Resources(cpu="1", memory="8Gi"),  # streams VG JSON; holds the phrase set
    "context_plan_images": Resources(cpu="1", memory="2Gi"),
    "context_encode_phrases": Resources(cpu="4", memory="16Gi", gpus=1),
    "context_build_index": Resources(cpu="8", memory="32Gi", gpus=1),  # all keys in memory; faiss-gpu k-means
    "context_encode_images": Resources(cpu="8", memory="32Gi", gpus=1),  # DataLoader workers cut 15 views
    "context_plan_retrieval": Resources(cpu="1", memory="2Gi"),
    "context_retrieve": Resources(cpu="4", memory="16Gi", gpus=1),
    "context_merge": Resources(cpu="4", memory="16Gi"),
    # X-LXMERT grid / box features and the visual vocabulary
    "xlxmert_plan": Resources(cpu="1", memory="2Gi"),
    "xlxmert_extract": Resources(cpu="8", memory="32Gi", gpus=1),  # X-152 + DataLoader decode workers
    "xlxmert_merge": Resources(cpu="2", memory="8Gi"),  # streamed; the HDF5 is built on local disk
    # faiss k-means holds K * max_points_per_centroid * d f32: 10000 * 256 * 2048 * 4 B = 21 GB, plus faiss's copy
    "xlxmert_kmeans": Resources(cpu="8", memory="64Gi", gpus=1),
    "xlxmert_assign_plan": Resources(cpu="1", memory="2Gi"),
    "xlxmert_assign": Resources(cpu="4", memory="16Gi", gpus=1),  # target read block by block; faiss-gpu search
    "xlxmert_assign_merge": Resources(cpu="2", memory="16Gi"),  # image -> ids dict of the largest target
    # Maria's vokenization
    "vokens_train": Resources(cpu="32", memory="128Gi", gpus=4),  # torchrun: one process per GPU
    "vokens_matcher": Resources(cpu="1", memory="1Gi"),
    "vokens_tokenize_plan": Resources(cpu="1", memory="2Gi"),  # two passes over the corpus
    "vokens_tokenize": Resources(cpu="4", memory="8Gi"),  # Rust tokenizer threads
    "vokens_tokenize_merge": Resources(cpu="2", memory="8Gi"),
    "vokens_keys_plan": Resources(cpu="1", memory="4Gi"),
    "vokens_keys": Resources(cpu="8", memory="32Gi", gpus=1),  # DataLoader workers decode
    "vokens_keys_merge": Resources(cpu="2", memory="8Gi"),
    "vokens_plan": Resources(cpu="2", memory="8Gi"),  # hashes the key and token files
    "vokens_vokenize": Resources(cpu="4", memory="32Gi", gpus=1),  # all keys in memory; faiss-gpu
    "vokens_merge": Resources(cpu="2", memory="8Gi"),
}


def stage_image(module: str) -> str:
    """The image of the components defined in ``module`` (``vlprep_components.regions`` -> vlprep-regions)."""
    stage = module.rpartition(".")[2]
    if stage not in IMAGES:
        raise KeyError(f"{module}: no image for stage {stage!r}; add it to STAGES and a target to images/Dockerfile")
    return IMAGES[stage]


def component(fn):
    """``fn`` as a KFP component in its stage's image, with the resources its entry here names (the key is
    ``fn``'s name).

    The body imports vlprep (installed in the image with the same kfp), so no pip runs at pod start.
    """
    from kfp import dsl

    if fn.__name__ not in COMPONENTS:
        raise KeyError(f"component {fn.__name__}: add its image and resources to COMPONENTS in {__file__}")
    return dsl.component(base_image=stage_image(fn.__module__), install_kfp_package=False)(fn)


def configure(task):
    """Apply the task's component's declared resources, GPU and retry policy to it."""
    r = COMPONENTS[task.component_spec.name.replace("-", "_")]
    task.set_cpu_request(r.cpu).set_cpu_limit(r.cpu)
    task.set_memory_request(r.memory).set_memory_limit(r.memory)
    if r.gpus:
        from kfp import kubernetes

        task.set_accelerator_type(GPU_TYPE).set_accelerator_limit(r.gpus)
        # GPU node pools are tainted so that only GPU work lands there
        kubernetes.add_toleration(task, key=GPU_TYPE, operator="Exists", effect="NoSchedule")
    task.set_retry(num_retries=r.retries, backoff_duration="30s", backoff_factor=2.0)
    return task
