"""The bundled sample dataset: the embedded default every workflow runs on (see README.md here)."""

from importlib import resources


def sample_dir() -> str:
    """The folder holding the sample (``dataset_coco.json``, ``images/``, ``vg/``, ``test1k_ids.txt``)."""
    return str(resources.files("vlprep") / "sample")
