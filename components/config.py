"""The one place that says which image and which resources each component gets.

A new image tag is one edit here, or ``VLPREP_IMAGE_REGISTRY`` / ``VLPREP_IMAGE_TAG`` at compile time
(``make compile IMAGE_REGISTRY=... TAG=...``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

REGISTRY = os.environ.get("VLPREP_IMAGE_REGISTRY", "ghcr.io/vlprep")
TAG = os.environ.get("VLPREP_IMAGE_TAG", "0.1.0")

IMAGES = {
    "cpu": f"{REGISTRY}/vlprep-cpu:{TAG}",  # images/cpu.Dockerfile
    "gpu": f"{REGISTRY}/vlprep-gpu:{TAG}",  # images/gpu.Dockerfile
}

GPU_TYPE = "nvidia.com/gpu"
PARALLELISM = 8  # pods at once per fan-out (ParallelFor); a literal: KFP needs it at compile time


@dataclass(frozen=True)
class Resources:
    image: str
    cpu: str
    memory: str
    gpus: int = 0
    retries: int = 2


# component name (= its function's name, ``<stage>_<stage function>``) -> image and resources
# (requests == limits: predictable scheduling)
COMPONENTS = {
    "captions_plan": Resources("cpu", cpu="1", memory="2Gi"),
    "captions_extract": Resources("cpu", cpu="1", memory="2Gi"),
    "captions_merge": Resources("cpu", cpu="1", memory="2Gi"),
    "regions_plan": Resources("cpu", cpu="1", memory="2Gi"),
    "regions_extract": Resources("gpu", cpu="8", memory="32Gi", gpus=1),
    "regions_merge": Resources("cpu", cpu="2", memory="8Gi"),
    "regions_lmdb": Resources("cpu", cpu="2", memory="8Gi"),
    "regions_hard_negatives": Resources("cpu", cpu="4", memory="32Gi"),
    # cross-modal context (Xmodal-Ctx / HAAV)
    "context_plan": Resources("cpu", cpu="1", memory="8Gi"),  # streams VG JSON; holds the phrase set
    "context_plan_images": Resources("cpu", cpu="1", memory="2Gi"),
    "context_encode_phrases": Resources("gpu", cpu="4", memory="16Gi", gpus=1),
    "context_build_index": Resources("gpu", cpu="8", memory="32Gi", gpus=1),  # all keys in memory; faiss-gpu k-means
    "context_encode_images": Resources("gpu", cpu="8", memory="32Gi", gpus=1),  # DataLoader workers cut 15 views
    "context_plan_retrieval": Resources("cpu", cpu="1", memory="2Gi"),
    "context_retrieve": Resources("gpu", cpu="4", memory="16Gi", gpus=1),
    "context_merge": Resources("cpu", cpu="4", memory="16Gi"),
    # Maria's vokenization
    "vokens_train": Resources("gpu", cpu="32", memory="128Gi", gpus=4),  # torchrun: one process per GPU
    "vokens_matcher": Resources("cpu", cpu="1", memory="1Gi"),
    "vokens_tokenize_plan": Resources("cpu", cpu="1", memory="2Gi"),  # two passes over the corpus
    "vokens_tokenize": Resources("cpu", cpu="4", memory="8Gi"),  # Rust tokenizer threads
    "vokens_tokenize_merge": Resources("cpu", cpu="2", memory="8Gi"),
    "vokens_keys_plan": Resources("cpu", cpu="1", memory="4Gi"),
    "vokens_keys": Resources("gpu", cpu="8", memory="32Gi", gpus=1),  # DataLoader workers decode
    "vokens_keys_merge": Resources("cpu", cpu="2", memory="8Gi"),
    "vokens_plan": Resources("cpu", cpu="2", memory="8Gi"),  # hashes the key and token files
    "vokens_vokenize": Resources("gpu", cpu="4", memory="32Gi", gpus=1),  # all keys in memory; faiss-gpu
    "vokens_merge": Resources("cpu", cpu="2", memory="8Gi"),
}


def image(component: str) -> str:
    return IMAGES[COMPONENTS[component].image]


def component(fn):
    """``fn`` as a KFP component in the image its entry here names (the entry's key is ``fn``'s name).

    The body imports vlprep (installed in the image with the same kfp), so no pip runs at pod start.
    """
    from kfp import dsl

    if fn.__name__ not in COMPONENTS:
        raise KeyError(f"component {fn.__name__}: add its image and resources to COMPONENTS in {__file__}")
    return dsl.component(base_image=image(fn.__name__), install_kfp_package=False)(fn)


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
