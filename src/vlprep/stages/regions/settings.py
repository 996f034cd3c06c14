"""What a region-feature run computes (fixed at plan time), and the names of its outputs.

Output layout: a run's ``out`` is laid out as its consumers open it, so nothing is renamed by hand.

- ``out`` is VOLTA's ``datasets/{mscoco,flickr30k}`` folder (VOLTA ``config_tasks/*.yml``: ``dataroot``
  holds ``hard_negative.pkl`` and ``annotations/``; ``features_h5path1`` is
  ``<dataroot>/resnet101_faster_rcnn_genome_imgfeats/volta/{trainval,test,flickr30k}_feat.lmdb``).
  The 13-field TSVs lie in ``resnet101_faster_rcnn_genome_imgfeats/`` under the names VOLTA's
  ``convert_coco_lmdb.py`` / ``convert_flickr30k_lmdb.py`` open in their ``--indir``:
  ``{train2014,val2014,test2015}_obj36-36.tsv`` and, for Flickr30k (whatever its image folder is called),
  ``flickr30k_obj36-36.tsv``.
- ``lxmert/`` mirrors the LXMERT repository's root: ``lxmert/data/mscoco_imgfeat/{split}_obj36.tsv``
  (LXMERT ``src/tasks/vqa_data.py``, ``src/pretrain/lxmert_data.py``); link or copy
  ``lxmert/data/mscoco_imgfeat`` to LXMERT's ``data/mscoco_imgfeat``. Flickr30k goes to
  ``lxmert/data/flickr30k_imgfeat/flickr30k_obj36.tsv`` (LXMERT has no Flickr30k task).
- ``h5/{split}_obj{lo}-{hi}.h5``: our own region H5 (no upstream consumer opens it by name).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlprep import VlprepError, stage
from vlprep.data.ids import DATASETS

FORMATS = ("volta-tsv", "lxmert-tsv", "h5")
ARCHS = ("full", "tiny")
# COCO split folders -> VOLTA LMDB name; any other folder gets {folder}_feat.lmdb
COCO_LMDB = {"train2014": "trainval_feat.lmdb", "val2014": "trainval_feat.lmdb", "test2015": "test_feat.lmdb"}
REPORT = "report.html"
VOLTA_DIR = "resnet101_faster_rcnn_genome_imgfeats"  # VOLTA's configs: <dataroot>/<this>/volta/*_feat.lmdb


@dataclass(frozen=True)
class Settings(stage.Settings):
    images: str  # image folder / gs:// prefix, list file (.txt) or Karpathy file (.json)
    image_root: str = ""  # with a Karpathy file: the folder holding filepath/filename
    dataset: str = "coco"  # coco | flickr30k: image ids and LMDB names
    recipe: str = "caffe36"  # box selection (vlprep.models.detection.selection)
    recipe_params: dict = field(default_factory=dict)  # overrides of the recipe's fields
    weights: str = "random:0"  # default, URL, gs://, local path or random:<seed> (the plan pins default)
    arch: str = "full"  # full | tiny (a small test configuration)
    autocast: str = ""  # "" (float32) or a torch dtype name for autocast on CUDA
    formats: str = "volta-tsv,lxmert-tsv"  # comma list of FORMATS
    lmdb: bool = True  # VOLTA's LMDB from the 13-field TSVs
    annotations: str = ""  # caption annotations folder (train_ann.jsonl): hard_negative.pkl when given
    vocab_objects: str = ""  # VG vocabularies for the report's labels ("" = placeholders)
    vocab_attributes: str = ""
    weights_fallback: str = ""  # why the plan turned default into random:0 ("" = it did not)

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


def output_split(folder: str, dataset: str) -> str:
    """The split an image folder's features are named after: COCO the folder (train2014, ...);
    Flickr30k always ``flickr30k`` (VOLTA's ``--split flickr30k``), whatever the folder is called."""
    return "flickr30k" if dataset == "flickr30k" else folder


def volta_tsv_path(split: str, settings: Settings) -> str:
    """``resnet101_faster_rcnn_genome_imgfeats/{split}_obj{lo}-{hi}.tsv`` (VOLTA's converters' input)."""
    lo, hi = box_range(settings)
    return f"{VOLTA_DIR}/{split}_obj{lo}-{hi}.tsv"


def lxmert_tsv_path(split: str, settings: Settings) -> str:
    """``lxmert/data/mscoco_imgfeat/{split}_obj36.tsv`` as LXMERT's loaders open it (``obj{lo}-{hi}``
    when the recipe keeps a varying number of boxes: LXMERT itself only knows ``obj36``)."""
    lo, hi = box_range(settings)
    boxes = f"obj{hi}" if lo == hi else f"obj{lo}-{hi}"
    folder = "flickr30k_imgfeat" if settings.dataset == "flickr30k" else "mscoco_imgfeat"
    return f"lxmert/data/{folder}/{split}_{boxes}.tsv"


def h5_path(split: str, settings: Settings) -> str:
    lo, hi = box_range(settings)
    return f"h5/{split}_obj{lo}-{hi}.h5"


def split_of_tsv(name: str) -> str:
    """``train2014`` from ``train2014_obj36-36.tsv``."""
    return name.rsplit("_obj", 1)[0]


def lmdb_path(split: str, dataset: str) -> str:
    """``resnet101_faster_rcnn_genome_imgfeats/volta/{trainval,test,flickr30k}_feat.lmdb``, where VOLTA's
    task configs open it (``features_h5path1``)."""
    name = "flickr30k_feat.lmdb" if dataset == "flickr30k" else COCO_LMDB.get(split, f"{split}_feat.lmdb")
    return f"{VOLTA_DIR}/volta/{name}"


STAGE = stage.Stage("regions", Settings)
