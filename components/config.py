"""The one place that says which image and which resources each component gets.

Images follow one rule: a component runs in the image of its stage, the stage being the components
module that defines it (components/regions.py -> vlprep-regions, built from the ``regions`` target of
images/Dockerfile). A new image tag is one edit here, or ``VLPREP_IMAGE_REGISTRY`` /
``VLPREP_IMAGE_TAG`` at compile time (``make compile IMAGE_REGISTRY=... TAG=...``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

REGISTRY = os.environ.get("VLPREP_IMAGE_REGISTRY", "ghcr.io/vlprep")
TAG = os.environ.get("VLPREP_IMAGE_TAG", "0.1.0")

# one image per stage: images/Dockerfile has a target of each name, `make images` builds them all
STAGES = ("captions", "regions", "context", "xlxmert", "vokens")
IMAGES = {stage: f"{REGISTRY}/vlprep-{stage}:{TAG}" for stage in STAGES}

GPU_TYPE = "nvidia.com/gpu"


@dataclass(frozen=True)
class Resources:
    cpu: str
    memory: str
    gpus: int = 0
    retries: int = 2


# component name -> resources (requests == limits: predictable scheduling)
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
    "context_index": Resources(cpu="8", memory="32Gi", gpus=1),  # all keys in memory; faiss-gpu k-means
    "context_encode_images": Resources(cpu="8", memory="32Gi", gpus=1),  # DataLoader workers cut 15 views
    "context_retrieve_plan": Resources(cpu="1", memory="2Gi"),
    "context_retrieve": Resources(cpu="4", memory="16Gi", gpus=1),
    "context_merge": Resources(cpu="4", memory="16Gi"),
}


def stage_image(module: str) -> str:
    """The image of the components defined in ``module`` (``vlprep_components.regions`` -> vlprep-regions)."""
    stage = module.rpartition(".")[2]
    if stage not in IMAGES:
        raise KeyError(f"{module}: no image for stage {stage!r}; add it to STAGES and a target to images/Dockerfile")
    return IMAGES[stage]


def image(component: str) -> str:
    """The image of ``component``, called in its decorator: the stage image of the calling module."""
    if component not in COMPONENTS:
        raise KeyError(f"{component}: declare its resources in components/config.py COMPONENTS")
    return stage_image(sys._getframe(1).f_globals["__name__"])  # the frame of the module defining it


def configure(task, component: str):
    """Apply the component's declared resources, GPU and retry policy to a pipeline task."""
    r = COMPONENTS[component]
    task.set_cpu_request(r.cpu).set_cpu_limit(r.cpu)
    task.set_memory_request(r.memory).set_memory_limit(r.memory)
    if r.gpus:
        from kfp import kubernetes

        task.set_accelerator_type(GPU_TYPE).set_accelerator_limit(r.gpus)
        # GPU node pools are tainted so that only GPU work lands there
        kubernetes.add_toleration(task, key=GPU_TYPE, operator="Exists", effect="NoSchedule")
    task.set_retry(num_retries=r.retries, backoff_duration="30s", backoff_factor=2.0)
    return task
