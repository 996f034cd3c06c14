"""What a region-feature run computes (fixed at plan time), and the names of its outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlprep import VlprepError, stage
from vlprep.data.ids import DATASETS

FORMATS = ("volta-tsv", "lxmert-tsv", "h5")
ARCHS = ("full", "tiny")
# COCO split folders -> VOLTA LMDB name; any other folder gets {folder}_feat.lmdb
COCO_LMDB = {"train2014": "trainval_feat.lmdb", "val2014": "trainval_feat.lmdb", "test2015": "test_feat.lmdb"}
REPORT = "report.html"


@dataclass(frozen=True)
class Settings(stage.Settings):
    images: str  # image folder / gs:// prefix, list file (.txt) or Karpathy file (.json)
    image_root: str = ""  # with a Karpathy file: the folder holding filepath/filename
    dataset: str = "coco"  # coco | flickr30k: image ids and LMDB names
    recipe: str = "caffe36"  # box selection (vlprep.models.detection.selection)
    recipe_params: dict = field(default_factory=dict)  # overrides of the recipe's fields
    weights: str = "random:0"  # URL, gs://, local path or random:<seed>
    arch: str = "full"  # full | tiny (a small test configuration)
    autocast: str = ""  # "" (float32) or a torch dtype name for autocast on CUDA
    formats: str = "volta-tsv,lxmert-tsv"  # comma list of FORMATS
    lmdb: bool = True  # VOLTA's LMDB from the 13-field TSVs
    annotations: str = ""  # caption annotations folder (train_ann.jsonl): hard_negative.pkl when given
    vocab_objects: str = ""  # VG vocabularies for the report's labels ("" = placeholders)
    vocab_attributes: str = ""

    SHARD_FIELDS = ("recipe", "recipe_params", "weights", "arch", "autocast")

    @property
    def wanted_formats(self) -> list[str]:
        return [f.strip() for f in self.formats.split(",") if f.strip()]

    def check(self) -> Settings:
        """Refuse unknown names before anything is planned."""
        if self.dataset not in DATASETS:
            raise VlprepError(f"dataset {self.dataset!r}: use one of {', '.join(DATASETS)}")
        bad = [f for f in self.wanted_formats if f not in FORMATS]
        if bad or not self.wanted_formats:
            raise VlprepError(f"format(s) {bad or self.formats!r}: use some of {', '.join(FORMATS)}")
        if self.arch not in ARCHS:
            raise VlprepError(f"arch {self.arch!r}: use one of {', '.join(ARCHS)}")
        self.recipe_object()  # an unknown recipe or parameter raises here
        from vlprep.models.weights import check_spec

        check_spec(self.weights, "--weights")
        for flag, spec in (("--vocab-objects", self.vocab_objects), ("--vocab-attributes", self.vocab_attributes)):
            if spec:
                check_spec(spec, flag)
        return self

    def recipe_object(self):
        from vlprep.models.detection.selection import get_recipe

        return get_recipe(self.recipe, **(self.recipe_params or {}))


def box_range(settings: Settings) -> tuple[int, int]:
    """(min, max) boxes per image under the recipe (names the TSVs, e.g. ``obj36-36``)."""
    return settings.recipe_object().box_range


def tsv_name(split: str, settings: Settings) -> str:
    lo, hi = box_range(settings)
    return f"{split}_obj{lo}-{hi}.tsv"


def lmdb_name(split: str, dataset: str) -> str:
    return "flickr30k_feat.lmdb" if dataset == "flickr30k" else COCO_LMDB.get(split, f"{split}_feat.lmdb")


STAGE = stage.Stage("regions", Settings)
