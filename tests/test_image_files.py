"""The image build's inputs agree with the code: locks with pyproject, targets with components.

No Docker needed; tests/test_containers.py builds nothing either but runs the built images.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import tomllib

from kfp_harness import REPO, component_modules
from vlprep_components import config


def _lock_module():
    spec = importlib.util.spec_from_file_location("lock", REPO / "images" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_locks_are_generated_from_pyproject():
    lock = _lock_module()
    layers = lock.layer_requirements(tomllib.loads((REPO / "pyproject.toml").read_text()))
    assert set(layers) == {"core", "torch", *lock.TORCH_STAGES}
    assert not any("torch" in r for r in layers["core"]), "the captions image (core only) must not get torch"
    for layer, requirements in layers.items():
        text = (REPO / "images" / "locks" / f"{layer}.txt").read_text()
        assert text == lock.HEADER + "".join(f"{r}\n" for r in requirements), f"{layer}.txt is stale: run `make lock`"
    pinned = dict(line.split("==") for line in (REPO / "images/locks/constraints.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    for requirements in layers.values():
        for requirement in requirements:
            name, version = requirement.split("==")
            assert pinned.get(lock.canonical(name)) == version, f"constraints.txt lacks {requirement}: run `make lock`"
    assert "vlprep" not in pinned


def test_every_stage_has_an_image_target_and_make_builds_it():
    dockerfile = (REPO / "images" / "Dockerfile").read_text()
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, flags=re.M))
    assert set(config.STAGES) <= targets
    stages = re.search(r"^STAGES := (.*)$", (REPO / "Makefile").read_text(), flags=re.M).group(1).split()
    assert tuple(stages) == config.STAGES
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(config.STAGES) - {"captions"} <= set(extras), "each torch stage installs its pyproject extra"


def test_each_component_runs_in_the_image_of_its_stage():
    from kfp.dsl.python_component import PythonComponent

    modules = component_modules()
    assert set(modules) == {name.replace("_", "-") for name in config.COMPONENTS}
    for module_name in set(modules.values()):
        stage = module_name.rpartition(".")[2]
        assert stage in config.STAGES, f"{module_name}: a components module needs a stage image"
        for obj in vars(importlib.import_module(module_name)).values():
            if isinstance(obj, PythonComponent) and obj.python_func.__module__ == module_name:
                image = obj.component_spec.implementation.container.image
                assert image == f"{config.REGISTRY}/vlprep-{stage}:{config.TAG}", obj.name
