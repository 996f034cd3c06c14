r"""Cross-modal context (Xmodal-Ctx / HAAV): CLIP visual context and retrieved Visual Genome phrases.

Outputs under ``out`` (``vlprep.formats.ctx_h5`` has the HDF5 details). ``out`` is the captioning model's
``--dataset_root``: Xmodal-Ctx ``m2/train.py`` and HAAV ``haav/train.py`` / ``test.py`` open
``{dataset_root}/vis_ctx.hdf5`` and ``{dataset_root}/txt_ctx.hdf5`` (upstream's READMEs link them there
from ``ctx/outputs/...``; here they are written there); add ``oscar.hdf5`` and ``annotations/`` beside them.

- ``vis_ctx.hdf5``: every image through CLIP's image tower, keyed by image id;
- ``captions_db/vg_phrases.txt``: the VG phrase list (one per line; line number = row id);
- ``captions_db/caption_db.hdf5``: phrase keys / values (``features`` in XC, ``values`` in HV) and
  texts, one group per batch of 512 rows (``recipe.caption_batch``), as upstream's ``encode_captions.py``;
- ``retrieved_captions/faiss.index``: the inner-product index over the keys;
- ``txt_ctx.hdf5``: top-k phrases (values, scores, texts) for the whole image, its
  five crops and its nine crops (``vlprep.models.crops``), k per recipe (XC 16/16/16, HV 128/32/16);
- ``context_report.html``: sample images with their crops drawn and the top phrases of each.

Steps (each a component of the ``context`` pipeline; :func:`run` runs them in this process, in the same
order):

1. :func:`plan` (``phrases.py``): the phrase list, the settings recorded (``settings.py``: recipe, weights,
   model config, batch sizes, top-k, index kind; every later step reads them, so steps of one run
   cannot disagree; ``default`` weights are pinned here once: the published ``openai`` file with its
   sha256, or ``random:0`` and the reason in ``weights_fallback``), the phrase blocks planned; :func:`plan_images` (``images.py``) plans the image blocks.
2. :func:`encode_phrases` (one task per phrase shard): keys and values of its phrase blocks.
3. :func:`build_index` (``caption_db.py``): ``caption_db.hdf5`` and the faiss index (``vlprep.index``).
4. :func:`encode_images` (one task per image shard): 15 views per image (whole, 5 and 9 crops), the
   visual context of the whole image and the 15 normalized query vectors, kept in the shard's parts so
   that retrieval does not decode again. Undecodable images are skipped and listed.
5. :func:`plan_retrieval` then :func:`retrieve` (``retrieval.py``; one task per image shard).
6. :func:`merge` (``outputs.py``): the two HDF5 files with images sorted by id, and the report.

**Which images**: every image of the source (``vlprep.data.images.list_images``). Upstream encodes the
Karpathy split's images (train2014 + val2014); pass ``dataset_coco.json`` (with ``image_root``) to get
exactly those.

**Image ids** (``vlprep.data.ids.context_key``, as upstream's COCO ids): the integer after the last ``_``
of the file stem (``COCO_val2014_000000531912.jpg`` -> ``531912``; a numeric stem such as Flickr30k's is
its own id). A name without such a number falls back to its stem (``cat.jpg`` -> ``"cat"``); upstream's
consumers read integer ids only. Two files with the same id stop the plan.

**Same bytes whatever the shard count.** Images and phrases are planned in fixed *blocks* (``image_batch``
images, default the recipe's 32 as upstream's retrieval batch; ``text_batch`` phrases) and every forward
pass and faiss search runs on one block (or fixed sub-batches of it), so no number depends on where the
shard boundaries fall; the merge sorts by image id. HDF5 files carry no timestamps, so identical inputs
give identical files. Resume: a shard whose done-marker verifies is skipped; each plan carries a
fingerprint of what its shards depend on (settings; for retrieval, also the index and the image parts),
so changing weights, model or index redoes the work instead of mixing old and new parts.
"""

from __future__ import annotations

import functools

from vlprep import stage
from vlprep.stages.context.caption_db import build_index, read_index_meta
from vlprep.stages.context.images import cut_views, encode_images, normalize, plan_images
from vlprep.stages.context.outputs import merge
from vlprep.stages.context.phrases import encode_phrases, phrases, plan
from vlprep.stages.context.retrieval import plan_retrieval, retrieve
from vlprep.stages.context.settings import (
    CAPTION_DB,
    FAISS_INDEX,
    PHRASES,
    REPORT,
    STAGE,
    TINY_CFG,
    TXT_CTX,
    VIS_CTX,
    Settings,
    encoder_for,
    make_settings,
)

__all__ = ["CAPTION_DB", "FAISS_INDEX", "PHRASES", "REPORT", "STAGE", "TINY_CFG", "TXT_CTX", "VIS_CTX", "Settings",
           "build_index", "cut_views", "encode_images", "encode_phrases", "encoder_for", "make_settings", "merge",
           "normalize", "phrases", "plan", "plan_images", "plan_retrieval", "read_index_meta", "retrieve", "run",
           "steps"]


def steps(out: str, settings: Settings, *, image_shards: int = 1, phrase_shards: int = 1, split: str = "balanced",
          runtime: stage.Runtime | None = None) -> list[stage.Step]:
    """The pipeline's steps, in its order (``vlprep_pipelines.context``)."""
    return [
        stage.Step("plan", lambda: plan(out, settings, num_shards=phrase_shards, split=split)),
        stage.Step("plan_images", lambda: plan_images(out, num_shards=image_shards, split=split)),
        stage.Step("encode_phrases", functools.partial(encode_phrases, runtime=runtime), over="plan"),
        stage.Step("build_index", lambda: build_index(out)),
        stage.Step("encode_images", functools.partial(encode_images, runtime=runtime), over="plan_images"),
        stage.Step("plan_retrieval", lambda: plan_retrieval(out)),
        stage.Step("retrieve", functools.partial(retrieve, runtime=runtime), over="plan_retrieval"),
        stage.Step("merge", lambda: merge(out)),
    ]


def run(out: str, settings: Settings, *, image_shards: int = 1, phrase_shards: int = 1, split: str = "balanced",
        runtime: stage.Runtime | None = None) -> dict:
    """The whole stage in this process: plan, every shard (done ones skipped), index, retrieval, merge."""
    results = stage.run_local(STAGE.name, steps(out, settings, image_shards=image_shards,
                                                phrase_shards=phrase_shards, split=split, runtime=runtime))
    return {**results["merge"], "index_skipped": results["build_index"]["skipped"],
            "skipped_shards": {"phrases": stage.skipped(results["encode_phrases"]),
                               "images": stage.skipped(results["encode_images"]),
                               "retrieval": stage.skipped(results["retrieve"])}}
