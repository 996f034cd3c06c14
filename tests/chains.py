"""Every component of a compiled pipeline, in the order its DAG runs them, on the bundled sample with tiny
settings: one definition per pipeline, run in a subprocess (tests/test_components.py) or in the stage
images (tests/test_containers.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kfp_harness import Runner, load, run_component, run_in_subprocess


@dataclass(frozen=True)
class Step:
    component: str
    workdir: Path
    values: dict  # parameter outputs
    artifacts: dict  # {artifact output name: local path}


class Chain:
    """Runs components of one compiled pipeline through one runner, each in its own work folder under
    ``root``, and records every step; the chains write their outputs under ``store``."""

    def __init__(self, pipeline: str, root: Path, runner: Runner = run_in_subprocess):
        self.spec, self.root, self.runner = load(pipeline)[0], Path(root), runner
        self.store = self.root / "store"
        self.steps: list[Step] = []

    def __call__(self, component: str, **params):
        workdir = self.root / "work" / f"{len(self.steps):02d}-{component}"
        values, artifacts = run_component(self.spec, component, params, workdir, self.runner)
        self.steps.append(Step(component, workdir, values, artifacts))
        return values.get("Output")

    def last(self, component: str) -> Step:
        """The latest step that ran ``component``."""
        return [s for s in self.steps if s.component == component][-1]

    def outputs(self, component: str) -> list:
        """The ``Output`` of every step that ran ``component``, in order."""
        return [s.values.get("Output") for s in self.steps if s.component == component]


def regions_chain(c: Chain, sample: Path) -> None:
    """The regions pipeline: captions (plan, extract per shard, merge) beside plan -> extract per shard
    -> merge -> LMDB, then hard negatives over the captions (tiny detector, random weights)."""
    store, annotations = str(c.store), str(c.store / "annotations")
    karpathy = str(sample / "dataset_coco.json")
    shards = c("captions-plan", karpathy=karpathy, dataset="coco", test1k_ids=str(sample / "test1k_ids.txt"),
               out=annotations, num_shards=2, split="balanced")
    done = [c("captions-extract", spec=s) for s in shards]
    c("captions-merge", shards=done, out=annotations)
    shards = c("regions-plan", images=str(sample / "images"), image_root="", dataset="coco", recipe="caffe36",
               recipe_params={}, weights="random:0", arch="tiny", autocast="", formats="volta-tsv,lxmert-tsv,h5",
               lmdb=True, annotations=annotations, vocab_objects="", vocab_attributes="", out=store, num_shards=2,
               split="group")
    done = [c("regions-extract", spec=s, device="cpu", batch_size=4, num_workers=0) for s in shards]
    merged = c("regions-merge", shards=done, out=store)
    c("regions-lmdb", merged=merged, out=store)
    c("regions-hard-negatives", merged=merged, out=store)


def context_chain(c: Chain, sample: Path) -> None:
    """The context pipeline (tiny CLIP, random weights, exact index)."""
    store = str(c.store)
    phrases = c("context-plan", images=str(sample / "images"), image_root="",
                attributes=str(sample / "vg" / "attributes.json"),
                relationships=str(sample / "vg" / "relationships.json"), recipe="xmodal-ctx", weights="random:0",
                text_weights="", model_cfg="tiny", index="flat", topk="", attribute_leak=True, image_batch=2,
                text_batch=32, encode_batch=256, out=store, phrase_shards=2, split="balanced")
    images = c("context-plan-images", phrase_shards=phrases, out=store, image_shards=2, split="balanced")
    encoded = [c("context-encode-phrases", spec=s, device="cpu") for s in phrases]
    index = c("context-build-index", shards=encoded, out=store)
    encoded = [c("context-encode-images", spec=s, device="cpu", num_workers=0) for s in images]
    plan = c("context-plan-retrieval", images=encoded, index=index, out=store)
    retrieved = [c("context-retrieve", spec=s, device="cpu") for s in plan]
    c("context-merge", shards=retrieved, out=store)


def _xlxmert_features(c: Chain, sample: Path, kind: str) -> dict:
    """plan -> extract per shard -> merge of one kind of X-LXMERT features (tiny detector)."""
    shards = c("xlxmert-plan", images=str(sample / "images"), image_root="", dataset="coco", kind=kind,
               weights="random:0", config="", arch="tiny", autocast="", imsize=0, out=str(c.store), num_shards=2,
               split="balanced")
    done = [c("xlxmert-extract", spec=s, device="cpu", batch_size=2, num_workers=0) for s in shards]
    return c("xlxmert-merge", shards=done, out=str(c.store), kind=kind)


def xlxmert_chain(c: Chain, sample: Path) -> None:
    """The xlxmert pipeline: grid8 features -> k-means (k 8; dim 0: the tiny detector's) -> assign per
    shard -> merge; then boxes36 features."""
    store = str(c.store)
    merged = _xlxmert_features(c, sample, "grid8")
    trained = c("xlxmert-kmeans", merged=merged, out=store, features=[], src="", k=8, niter=20, dim=0, seed=1234,
                max_points_per_centroid=256, nredo=1, imsize=0, images="", device="cpu")
    plan = c("xlxmert-assign-plan", trained=trained, out=store, num_shards=2, split="balanced")
    assigned = [c("xlxmert-assign", spec=s, device="cpu") for s in plan]
    c("xlxmert-assign-merge", shards=assigned, out=store)
    _xlxmert_features(c, sample, "boxes36")


def vokens_chain(c: Chain, sample: Path) -> None:
    """The vokens pipeline, both matcher branches one after the other: train a tiny matcher (1 epoch, random
    backbones), check it as a given matcher, then tokenize, image keys and vokens with it, each fanned out."""
    store, vokens = str(c.store), sample / "vokens"
    corpus, tokenizer, captions = str(vokens / "valid.pkl.txt"), str(vokens / "wordpiece-sample"), \
        str(vokens / "mscoco_sample.json")
    trained = c("vokens-train", out=store, train_captions=captions, valid_captions=captions,
                train_image_root=str(sample / "images"), config="tiny", tokenizer=tokenizer, bert_weights="random:1",
                resnet_weights="random:2", epochs=1, batch_size=4, lr=1e-3, margin=0.5, grad_clip=5.0, max_len=16,
                valid_batch_size=4, seed=9595, num_workers=0, reshuffle_each_epoch=False)
    matcher = c("vokens-matcher", matcher=trained)
    plan = c("vokens-tokenize-plan", corpus=corpus, tokenizer=tokenizer, retrieval_input="", drop_empty=False,
             block_lines=8, out=store, num_shards=2, split="balanced")
    tokenized = [c("vokens-tokenize", spec=s) for s in plan]
    tokens = c("vokens-tokenize-merge", shards=tokenized, out=store, corpus=corpus, tokenizer=tokenizer)
    plan = c("vokens-keys-plan", images=captions, image_set="coco_sample", image_root=str(sample / "images"),
             matcher=matcher, config="tiny", batch_size=2, out=store, num_shards=2, split="balanced")
    extracted = [c("vokens-keys", spec=s, device="cpu", num_workers=0) for s in plan]
    keys = c("vokens-keys-merge", shards=extracted, out=store, image_set="coco_sample")
    plan = c("vokens-plan", tokens=tokens, keys=keys, matcher=matcher, config="tiny", topk=5, max_images=-1,
             page_lines=8, out=store, num_shards=2, split="balanced")
    searched = [c("vokens-vokenize", spec=s, device="cpu") for s in plan]
    c("vokens-merge", shards=searched, out=store, tokens=tokens)


# {compiled pipeline: its chain}
CHAINS = {"regions": regions_chain, "context": context_chain, "xlxmert": xlxmert_chain, "vokens": vokens_chain}
