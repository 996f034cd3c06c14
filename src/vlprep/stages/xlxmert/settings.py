"""What an X-LXMERT run computes (fixed at plan time), its work directories and the names of its outputs.

Two settings classes, one per half of the workflow:
- :class:`Settings`: grid / box feature extraction (images, dataset, kind, imsize, detector);
  its work directory is ``_work/xlxmert/<kind>`` (grid8 and boxes36 of one ``out`` do not meet);
- :class:`VocabSettings`: the visual vocabulary (k-means on a source, cluster ids of every target);
  ``_work/xlxmert/kmeans``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from vlprep import VlprepError, stage
from vlprep.formats import xlxmert_h5

KINDS = ("grid8", "boxes36")
ARCHS = ("full", "tiny")
DATASETS = tuple(xlxmert_h5.DATASET_FOLDERS)
ONE_FILE = "all"  # the part folder of datasets with a single feature file (VG, GQA)
CLUSTERS_REPORT = "xlxmert_clusters_report.html"
# (dataset, split folder) -> the name k-means calls that file (upstream's where it has one)
_UPSTREAM_NAMES = {("coco", "train2014"): "mscoco_train", ("coco", "val2014"): "mscoco_valid",
                   ("coco", "test2015"): "mscoco_test", ("nlvr2", "train"): "nlvr_train",
                   ("nlvr2", "dev"): "nlvr_valid", ("nlvr2", "test1"): "nlvr_test"}


def features_report(kind: str) -> str:
    return f"xlxmert_{kind}_report.html"


@dataclass(frozen=True)
class Settings(stage.Settings):
    images: str  # image folder / gs:// prefix, list file (.txt) or Karpathy file (.json)
    kind: str = "grid8"  # grid8 | boxes36 (vlprep.models.detection.x152 recipes)
    dataset: str = "coco"  # coco | vg | gqa | nlvr2: the output folders and file names
    image_root: str = ""  # with a Karpathy file: the folder holding filepath/filename
    weights: str = "random:0"  # default, URL, gs://, local path or random:<seed> (the plan pins default)
    config: str = ""  # detectron_config.yaml spec ("" = the published model's values)
    arch: str = "full"  # full | tiny (a small test configuration)
    autocast: str = ""  # "" (float32) or a torch dtype name for autocast on CUDA
    imsize: int = 0  # grid only: resize to imsize x imsize (0 = X-LXMERT's 800/1333 rule)
    weights_fallback: str = ""  # why the plan turned default into random:0 ("" = it did not)

    SHARD_FIELDS = ("kind", "weights", "config", "arch", "autocast", "imsize")

    def check(self) -> Settings:
        """Refuse unknown names and impossible combinations before anything is planned."""
        if self.kind not in KINDS:
            raise VlprepError(f"kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.dataset not in DATASETS:
            raise VlprepError(f"dataset {self.dataset!r}: use one of {', '.join(DATASETS)}")
        if self.arch not in ARCHS:
            raise VlprepError(f"arch {self.arch!r}: use one of {', '.join(ARCHS)}")
        if self.arch == "tiny" and self.config:
            raise VlprepError("arch 'tiny' has its own sizes; drop the config")
        if self.imsize and (self.kind != "grid8" or self.imsize < 32 or self.imsize % 32):
            raise VlprepError(f"imsize {self.imsize}: only grid8 takes one, a positive multiple of 32 (e.g. 448)")
        from vlprep.models.weights import check_spec

        check_spec(self.weights, "--weights")
        if self.config:
            check_spec(self.config, "--config")
        return self

    def recipe(self):
        from vlprep.models.detection.x152 import get_recipe

        return get_recipe(self.kind, imsize=self.imsize or None) if self.imsize else get_recipe(self.kind)

    def part_folder(self, uri: str) -> str:
        """The shard-part folder (= output file) an image goes to: its split folder, or ``all``."""
        if self.dataset not in xlxmert_h5.SPLIT_NAMES:
            return ONE_FILE
        folder = PurePosixPath(uri).parent.name
        self.feature_file(folder, uri)  # an image outside the dataset's split folders raises here
        return folder

    def feature_file(self, folder: str, uri: str = "") -> str:
        """X-LXMERT's relative path of the features of one part folder (``COCO/features/...h5``)."""
        split = None if folder == ONE_FILE else folder
        try:
            return xlxmert_h5.feature_file(self.dataset, split, kind=self.kind, imsize=self.imsize or None)
        except VlprepError as e:
            where = f"{uri}: " if uri else ""
            raise VlprepError(f"{where}{e}; X-LXMERT names {self.dataset} files by these image folders") from None

    def target_name(self, folder: str) -> str:
        """What k-means calls the grid file of ``folder`` (``mscoco_train``, ``vg``, ...)."""
        if folder == ONE_FILE:
            return self.dataset
        return _UPSTREAM_NAMES.get((self.dataset, folder), f"{self.dataset}_{folder}")


@dataclass(frozen=True)
class VocabSettings(stage.Settings):
    features: tuple[str, ...] = ()  # NAME=H5 or upstream names; () = the grid8 files extracted under out
    src: str = ""  # the feature set k-means trains on ("" = the first of features)
    k: int = 10000
    niter: int = 20
    dim: int = 2048  # 0 = the source's feature width
    seed: int = 1234
    max_points_per_centroid: int = 256
    nredo: int = 1
    imsize: int = 0  # names the files _imsize{N} and resolves upstream names to those features
    images: str = ""  # where the report finds images by file stem ("" = the grid8 extraction's)

    def check(self) -> VocabSettings:
        for name, value, low in (("k", self.k, 1), ("niter", self.niter, 1), ("dim", self.dim, 0),
                                 ("max_points_per_centroid", self.max_points_per_centroid, 1),
                                 ("nredo", self.nredo, 1), ("imsize", self.imsize, 0)):
            if int(value) < low:
                raise VlprepError(f"k-means {name}={value}: must be >= {low}")
        return self


def extraction_stage(kind: str) -> stage.Stage:
    """The stage (work directory ``_work/xlxmert/<kind>``) of one feature kind."""
    if kind not in KINDS:
        raise VlprepError(f"kind {kind!r}: use one of {', '.join(KINDS)}")
    return stage.Stage(f"xlxmert/{kind}", Settings)


VOCAB = stage.Stage("xlxmert/kmeans", VocabSettings)
ASSIGN = "assign"  # the assignment fan-out's step folder under the k-means work directory
