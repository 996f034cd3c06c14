"""Cluster manifests and images: files parse, the overlay refers to what the base defines, pins agree."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"


def _objects(directory: Path) -> list[dict]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objs = []
    for res in kust.get("resources", []):
        path = directory / res
        if path.is_dir():
            objs += _objects(path)
        else:
            objs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return objs


def test_every_manifest_parses():
    files = sorted(MANIFESTS.rglob("*.yaml"))
    assert len(files) >= 7
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            assert isinstance(doc, dict) and ("kind" in doc or "resources" in doc), f


def test_base_defines_what_the_runner_needs():
    objs = _objects(MANIFESTS / "base")
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert {("Namespace", "vlprep"), ("ServiceAccount", "vlprep-runner"), ("Role", "vlprep-pipeline-runner"),
            ("RoleBinding", "vlprep-pipeline-runner"), ("PersistentVolumeClaim", "vlprep-scratch")} <= kinds
    sa = next(o for o in objs if o["kind"] == "ServiceAccount")
    assert "iam.gke.io/gcp-service-account" in sa["metadata"]["annotations"]
    binding = next(o for o in objs if o["kind"] == "RoleBinding")
    assert ("Role", binding["roleRef"]["name"]) in kinds
    assert all(("ServiceAccount", s["name"]) in kinds for s in binding["subjects"])


def test_overlay_references_resolve():
    overlay = MANIFESTS / "overlays" / "gke"
    kust = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert all((overlay / r).resolve().is_dir() for r in kust["resources"])
    base = {(o["kind"], o["metadata"]["name"]) for o in _objects(overlay)}
    for patch in kust["patches"]:
        assert (overlay / patch["path"]).is_file(), patch
        target = (patch["target"]["kind"], patch["target"]["name"])
        assert target in base, f"patch {patch['path']} targets {target}, which the base does not define"
        body = yaml.safe_load((overlay / patch["path"]).read_text())
        assert (body["kind"], body["metadata"]["name"]) == target


def test_kustomize_build_when_kubectl_is_there():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the structural tests above still ran")
    out = subprocess.run([kubectl, "kustomize", str(MANIFESTS / "overlays" / "gke")], capture_output=True,
                         text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["namespace"] == "vlprep"
    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].startswith("vlprep-runner@")


def test_wheel_the_images_install_carries_everything(tmp_path):
    """The images `pip install .`: the wheel must hold components, pipelines and the sample data."""
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    names = set(zipfile.ZipFile(next(tmp_path.glob("vlprep-*.whl"))).namelist())
    for needed in ("vlprep/stages/regions/extract.py", "vlprep/stages/xlxmert/vocabulary.py", "vlprep/cli/__main__.py", "vlprep/reports/html.py",
                   "vlprep/sample/__init__.py", "vlprep_components/config.py", "vlprep_pipelines/demo.py",
                   "vlprep_pipelines/cli.py",
                   "vlprep/sample/dataset_coco.json", "vlprep/sample/vg/attributes.json",
                   "vlprep/sample/images/val2014/COCO_val2014_000000000005.jpg"):
        assert needed in names, needed
