r"""Cross-modal context (Xmodal-Ctx / HAAV): CLIP visual context and retrieved Visual Genome phrases.

Outputs under ``out``, in upstream's ``outputs/`` layout (``vlprep.formats.ctx_h5`` has the HDF5 details):

- ``image_features/vis_ctx.hdf5``: every image through CLIP's image tower, keyed by image id;
- ``captions_db/vg_phrases.txt``: the VG phrase list (one per line; line number = row id);
- ``captions_db/caption_db.hdf5``: phrase keys / values (``features`` in XC, ``values`` in HV) and
  texts, one group per batch of 512 rows (``recipe.caption_batch``), as upstream's ``encode_captions.py``;
- ``retrieved_captions/faiss.index``: the inner-product index over the keys;
- ``retrieved_captions/txt_ctx.hdf5``: top-k phrases (values, scores, texts) for the whole image, its
  five crops and its nine crops (``vlprep.models.crops``), k per recipe (XC 16/16/16, HV 128/32/16);
- ``context_report.html``: sample images with their crops drawn and the top phrases of each.

Steps (each a plain function; the ``crossmodal_context`` pipeline runs each as a component, :func:`run`
runs them all in one process):

1. :func:`plan`: build the phrase list (:func:`phrases`), write ``settings.json`` (recipe, weights,
   model config, batch sizes, top-k, index kind: every later step reads them from there, so steps of
   one run cannot disagree) and plan the phrase blocks; :func:`plan_images` plans the image blocks.
2. :func:`encode_phrases` (one task per phrase shard): keys and values of its phrase blocks.
3. :func:`build_index`: keys concatenated in row order; ``caption_db.hdf5``; faiss ``IVF{K},Flat``
   inner product with ``K = round(8*sqrt(n))``, trained on all keys, all keys added,
   ``nprobe = max(1, K // 10)`` (upstream's); or ``flat`` (exact ``IndexFlatIP``, for small corpora).
   On GPUs when ``faiss.get_num_gpus() > 0`` (training and adding; the saved index is a CPU index).
4. :func:`encode_images` (one task per image shard): images decoded by a torch ``DataLoader``
   (``num_workers`` processes), each cut into whole + 5 + 9 views, resized and centre-cropped as the
   recipe says (uint8 from the workers; the float normalization runs once per block on the model's
   device, bit-identical to ``vlprep.models.clip.preprocess``); the image tower gives the visual
   context of the whole image (XC: ``ln_post(CLS)``; HV: pooled + grid) and the 15 normalized query
   vectors, kept in the shard's parts so that retrieval does not decode again. Undecodable images
   (zero bytes, truncated, not an image) are skipped and listed in the shard's done-marker, the
   summary and the report.
5. :func:`plan_retrieval` then :func:`retrieve` (one task per image shard): faiss search of the
   shard's queries (GPU when present); row ids and scores as parts.
6. :func:`merge`: ``vis_ctx.hdf5`` and ``txt_ctx.hdf5`` with images sorted by id, values and texts
   looked up by row id, and the report.

**Which images**: every image of the source (``vlprep.data.images.list_images``). Upstream encodes the
Karpathy split's images (train2014 + val2014); pass ``dataset_coco.json`` (with ``image_root``) to get
exactly those.

**Image ids** (as upstream's COCO ids): the integer after the last ``_`` of the file stem
(``COCO_val2014_000000531912.jpg`` -> ``531912``; a numeric stem such as Flickr30k's ``1000092795`` is
its own id). A name without such a number falls back to its stem as the HDF5 name (``cat.jpg`` ->
``"cat"``); upstream's consumers read integer ids only, so such files serve other readers. Two files
with the same id (``train2014/..._000000000001`` and ``val2014/..._000000000001``) stop the plan.

**Same bytes whatever the shard count.** Images and phrases are planned in fixed *blocks* (``image_batch``
images, default the recipe's 32 as upstream's retrieval batch; ``text_batch`` phrases) and every
forward pass and faiss search runs on one block (or fixed sub-batches of it), so no number depends
on where the shard boundaries fall; the merge sorts by image id. HDF5 files carry no timestamps
(h5py does not track object times by default), so identical inputs give identical files. Resume: a
shard whose done-marker verifies is skipped; plan items carry a fingerprint of the settings (and,
for retrieval, of the index and the image parts), so changing weights, model or index redoes the work
instead of mixing old and new parts; a finished index is reused when its inputs are unchanged.

Memory and disk: an image shard holds its parts in memory until written (HV grid: 150 KB per
image); the index step holds all keys (n x d float32); the merge reads parts and values memory-mapped
(gs:// parts are copied to local temp files first) and writes each HDF5 file to a local file before
publishing it: give the merge pod disk for the outputs (COCO, XC ``txt_ctx.hdf5`` ~60 GB).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import html
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

import numpy as np

from vlprep import VlprepError, shards, storage
from vlprep.data import images as imgs
from vlprep.data import visual_genome as vg

log = logging.getLogger(__name__)

STAGE = "context"
VIEWS = ("whole", "five", "nine")
N_VIEWS = 15  # whole + 5 + 9 per image
INDEX_KINDS = ("ivf", "flat")

# A tiny model in the real (OpenAI ViT) architecture, for tests and quick demos (``model_cfg="tiny"``).
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

# outputs, relative to ``out``
VIS_CTX = "image_features/vis_ctx.hdf5"
PHRASES = "captions_db/vg_phrases.txt"
CAPTION_DB = "captions_db/caption_db.hdf5"
FAISS_INDEX = "retrieved_captions/faiss.index"
TXT_CTX = "retrieved_captions/txt_ctx.hdf5"
REPORT = "context_report.html"


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """What a run computes; fixed at plan time in ``settings.json``."""

    recipe: str
    weights: str
    text_weights: str  # HV's text model (ViT-L-14); "" = same spec as ``weights``
    model_cfg: dict | None
    index: str
    topk: tuple[int, int, int]
    image_batch: int
    text_batch: int
    encode_batch: int
    attribute_leak: bool

    def fingerprint(self, *fields: str) -> str:
        doc = {f: getattr(self, f) for f in fields} if fields else asdict(self)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


IMAGE_FIELDS = ("recipe", "weights", "text_weights", "model_cfg", "image_batch", "encode_batch")
TEXT_FIELDS = ("recipe", "weights", "text_weights", "model_cfg", "text_batch", "encode_batch")


def parse_model_cfg(value) -> dict | None:
    """``None``/``""``: the recipe's architectures; ``"tiny"``: :data:`TINY_CFG`; a dict or JSON object text."""
    if value in (None, "", {}):
        return None
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        if value == "tiny":
            return dict(TINY_CFG)
        try:
            doc = json.loads(value)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            return doc
    raise VlprepError(f"model_cfg {str(value)[:80]!r}: give 'tiny', an open_clip model config as a JSON object, or ''")


def parse_topk(value, recipe) -> tuple[int, int, int]:
    """``None``/``""``: the recipe's (whole, five, nine); else 3 ints ("8,4,2", [8, 4, 2]) or one for all."""
    if value in (None, "", (), []):
        return tuple(recipe.topk)
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        except ValueError:
            raise VlprepError(f"topk {value!r}: give 3 integers (whole,five,nine) or one") from None
    vals = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if len(vals) == 1:
        vals *= 3
    if len(vals) != 3 or min(vals) < 1:
        raise VlprepError(f"topk {value!r}: give 3 positive integers (whole,five,nine) or one")
    return tuple(vals)


def make_settings(recipe: str = "xmodal-ctx", weights: str = "openai", text_weights: str = "", model_cfg=None,
                  index: str = "ivf", topk=None, image_batch: int = 0, text_batch: int = 0, encode_batch: int = 256,
                  attribute_leak: bool = True) -> Settings:
    from vlprep.models.clip import get_recipe

    r = get_recipe(recipe)
    if index not in INDEX_KINDS:
        raise VlprepError(f"index {index!r}: use 'ivf' (upstream's IVF{{K}},Flat) or 'flat' (exact)")
    if r.image_model == r.text_model and text_weights not in ("", weights):
        raise VlprepError(f"{r.name} uses one CLIP model for images and text: give weights only, not text_weights")
    for name, v in (("image_batch", image_batch), ("text_batch", text_batch), ("encode_batch", encode_batch)):
        if int(v) < 0:
            raise VlprepError(f"{name} must be >= 1 (0 = default), got {v}")
    return Settings(
        recipe=r.name, weights=str(weights), text_weights=str(text_weights or ""), model_cfg=parse_model_cfg(model_cfg),
        index=index, topk=parse_topk(topk, r), image_batch=int(image_batch) or r.image_batch,
        text_batch=int(text_batch) or r.caption_batch, encode_batch=int(encode_batch) or 256,
        attribute_leak=bool(attribute_leak),
    )


def work_dir(out: str) -> str:
    return storage.join(out, "_work", STAGE)


def _settings_uri(out: str) -> str:
    return storage.join(work_dir(out), "settings.json")


def read_settings(out: str) -> Settings:
    uri = _settings_uri(out)
    try:
        doc = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise VlprepError(f"{uri}: settings missing; run the plan step first") from None
    doc["topk"] = tuple(doc["topk"])
    return Settings(**doc)


def _out_of(spec: dict) -> str:
    """``out`` of a shard spec (its plan is ``{out}/_work/context/<step>/plan.json``)."""
    return storage.parent(storage.parent(storage.parent(storage.parent(spec["plan"]))))


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in ("", "auto", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VlprepError(f"device {device!r}: no CUDA GPU visible to torch; use 'cpu' or 'auto'")
    return device


_ENCODERS: dict = {}


def encoder_for(settings: Settings, device: str):
    """The recipe's ``ClipContextEncoder`` (one kept per process, so ``run`` loads the models once)."""
    from vlprep.models.clip import ClipContextEncoder, get_recipe

    key = (settings.recipe, settings.weights, settings.text_weights, json.dumps(settings.model_cfg, sort_keys=True),
           device, settings.encode_batch)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        r = get_recipe(settings.recipe)
        weights = settings.weights if r.image_model == r.text_model else {
            "image": settings.weights, "text": settings.text_weights or settings.weights}
        _ENCODERS[key] = ClipContextEncoder(r, weights=weights, model_cfg=settings.model_cfg, device=device,
                                            batch_size=settings.encode_batch)
    return _ENCODERS[key]


# ---------------------------------------------------------------- image ids


def image_key(uri: str) -> int | str:
    """The image id: int after the last ``_`` of the stem (COCO), else the stem (see the module docstring)."""
    stem = PurePosixPath(str(uri)).stem
    tail = stem.rsplit("_", 1)[-1]
    if tail.isascii() and tail.isdigit():
        return int(tail)
    return stem


def key_order(key: int | str) -> tuple:
    """Sort order of ids: integers by value, then stems by code point."""
    return (0, key, "") if isinstance(key, int) else (1, 0, key)


# ---------------------------------------------------------------- plan


def phrases(attributes: str, relationships: str, out_uri: str, attribute_leak: bool = True) -> dict:
    """Build the VG phrase list (``vlprep.data.visual_genome``) and write it to ``out_uri``, one per line."""
    items = vg.build_phrases(attributes, relationships, attribute_leak=attribute_leak)
    if not items:
        raise VlprepError(f"{attributes}, {relationships}: no phrases (no attributes and no relationships with synsets)")
    with storage.open_write(out_uri) as f:
        n = vg.write_phrases(items, f)
    return {"phrases": n, "out": out_uri, "attribute_leak": attribute_leak}


def read_phrase_file(uri: str) -> list[str]:
    try:
        with storage.open_read(uri) as f:
            return vg.read_phrases(f)
    except FileNotFoundError:
        raise VlprepError(f"{uri}: phrase file missing; run the plan step first") from None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def plan_images(images: str, out: str, num_shards: int = 1, image_root: str = "") -> list[dict]:
    """After :func:`plan`: shards of blocks of ``image_batch`` sorted image URIs (item: ``[fingerprint, [uri, ...]]``)."""
    settings = read_settings(out)
    uris = imgs.list_images(images, image_root)
    seen: dict = {}
    for uri in uris:
        key = image_key(uri)
        if key in seen:
            raise VlprepError(f"{seen[key]} and {uri} have the same image id {key!r}; the context files are keyed "
                              "by id, so give one of them (e.g. one COCO split folder at a time)")
        seen[key] = uri
    fp = settings.fingerprint(*IMAGE_FIELDS)
    b = settings.image_batch
    items = [[fp, uris[i:i + b]] for i in range(0, len(uris), b)]
    return shards.plan(items, int(num_shards), storage.join(work_dir(out), "images"))


def plan_phrases(out: str, num_shards: int, settings: Settings) -> list[dict]:
    """Shards of blocks of ``text_batch`` phrases (item: ``[fingerprint, start, end, sha of the block]``)."""
    items = read_phrase_file(storage.join(out, PHRASES))
    fp = settings.fingerprint(*TEXT_FIELDS)
    b = settings.text_batch
    blocks = [[fp, s, min(s + b, len(items)), _sha("\n".join(items[s:s + b]))] for s in range(0, len(items), b)]
    return shards.plan(blocks, num_shards, storage.join(work_dir(out), "phrases"))


def plan(attributes: str, relationships: str, out: str, phrase_shards: int = 1, recipe: str = "xmodal-ctx",
         weights: str = "openai", text_weights: str = "", model_cfg=None, index: str = "ivf", topk=None,
         image_batch: int = 0, text_batch: int = 0, encode_batch: int = 256, attribute_leak: bool = True) -> dict:
    """Settings, the phrase list and the phrase fan-out (then :func:`plan_images`).

    Returns ``{"phrases": shard specs, "n_phrases": n, "settings": {...}}``.
    """
    settings = make_settings(recipe, weights, text_weights, model_cfg, index, topk, image_batch, text_batch,
                             encode_batch, attribute_leak)
    built = phrases(attributes, relationships, storage.join(out, PHRASES), settings.attribute_leak)
    if max(settings.topk) > built["phrases"]:
        raise VlprepError(f"top-k {settings.topk} is more than the {built['phrases']} phrases of the corpus; "
                          "pass a smaller topk (whole,five,nine)")
    storage.write_text(_settings_uri(out), json.dumps(asdict(settings), indent=1, sort_keys=True))
    return {"phrases": plan_phrases(out, int(phrase_shards), settings), "n_phrases": built["phrases"],
            "settings": asdict(settings)}


# ---------------------------------------------------------------- phrase encoding


def _save_npy(uri: str, arr: np.ndarray) -> None:
    with storage.open_write(uri) as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)


def _load_npy(uri: str) -> np.ndarray:
    import io

    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def encode_phrases(spec: dict, device: str = "auto") -> dict:
    """One phrase shard: ``keys.npy`` (L2-normalized) and ``values.npy`` of its rows, in row order."""
    out = _out_of(spec)
    settings = read_settings(out)
    dev = resolve_device(device)

    def work(shard: shards.Shard) -> dict:
        items = read_phrase_file(storage.join(out, PHRASES))
        enc = encoder_for(settings, dev)
        keys, values = [], []
        for _, s, e, sha in shard.items:
            block = items[s:e]
            if _sha("\n".join(block)) != sha:
                raise VlprepError(f"{storage.join(out, PHRASES)} changed since the plan (rows {s}-{e}); rerun the plan")
            k, v = enc.encode_texts(block)
            keys.append(k)
            values.append(v)
        _save_npy(shard.part("keys.npy"), np.concatenate(keys))
        _save_npy(shard.part("values.npy"), np.concatenate(values))
        return {"parts": ["keys.npy", "values.npy"], "failed": [], "rows": int(sum(len(k) for k in keys)),
                "device": dev, "random_weights": enc.is_random}

    return shards.run_shard(spec, work, f"{STAGE}/phrases", {"device": dev, **asdict(settings)})


# ---------------------------------------------------------------- index


def ivf_params(n: int) -> tuple[int, int]:
    """(K, nprobe) of upstream's index: K = round(8*sqrt(n)) lists, nprobe = max(1, K // 10)."""
    k = int(round(8 * math.sqrt(n)))
    return k, max(1, k // 10)


def _num_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def make_index(keys: np.ndarray, kind: str = "ivf", use_gpu: bool | None = None):
    """A trained, filled inner-product faiss index over ``keys`` and its description."""
    import faiss

    keys = np.ascontiguousarray(keys, dtype=np.float32)
    n, d = keys.shape
    gpus = _num_gpus() if use_gpu is None or use_gpu else 0
    if kind == "flat":
        index, info = faiss.IndexFlatIP(d), {"factory": "Flat", "nlist": None, "nprobe": None}
    elif kind == "ivf":
        k, nprobe = ivf_params(n)
        if n < k:
            raise VlprepError(f"{n} phrases are too few to train IVF{k} (K = round(8*sqrt(n)) needs n >= K); "
                              "use index='flat' (exact search) for a corpus this small")
        index = faiss.index_factory(d, f"IVF{k},Flat", faiss.METRIC_INNER_PRODUCT)
        info = {"factory": f"IVF{k},Flat", "nlist": k, "nprobe": nprobe}
    else:
        raise VlprepError(f"index {kind!r}: use 'ivf' or 'flat'")
    if gpus:
        gindex = faiss.index_cpu_to_all_gpus(index)
        gindex.train(keys)
        gindex.add(keys)
        index = faiss.index_gpu_to_cpu(gindex)
    else:
        index.train(keys)
        index.add(keys)
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = info["nprobe"]
    return index, {**info, "n": int(n), "dim": int(d), "metric": "inner_product", "gpus": int(gpus)}


def _index_meta_uri(out: str) -> str:
    return storage.join(work_dir(out), "index", "index.json")


def _verify_files(out: str, files: dict) -> bool:
    for rel, sha in files.items():
        uri = storage.join(out, rel)
        if not storage.exists(uri) or storage.sha256(uri) != sha:
            return False
    return True


def build_index(out: str, use_gpu: bool | None = None) -> dict:
    """Merge the phrase shards: ``caption_db.hdf5``, the faiss index, and ``values.npy`` for the merge."""
    import faiss

    from vlprep.formats import ctx_h5
    from vlprep.models.clip import get_recipe

    settings = read_settings(out)
    recipe = get_recipe(settings.recipe)
    plan_uri = storage.join(work_dir(out), "phrases", "plan.json")
    done = shards.collect(plan_uri)
    fingerprint = hashlib.sha256(json.dumps(
        [settings.index, settings.recipe, [m["parts"] for _, m in done]], sort_keys=True).encode()).hexdigest()
    meta_uri = _index_meta_uri(out)
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError):
        meta = json.loads(storage.read_text(meta_uri))
        if meta["fingerprint"] == fingerprint and _verify_files(out, meta["files"]):
            return {**meta, "skipped": True}

    keys = np.concatenate([_load_npy(s.part("keys.npy")) for s, _ in done])
    texts = read_phrase_file(storage.join(out, PHRASES))
    if len(texts) != len(keys):
        raise VlprepError(f"{storage.join(out, PHRASES)} has {len(texts)} phrases but the shards encoded {len(keys)}; "
                          "rerun the plan")
    values_rel = storage.join("_work", STAGE, "index", "values.npy")
    value_dim = None
    batch = recipe.caption_batch
    with storage.local_file_for(storage.join(out, values_rel)) as vpath, \
            storage.local_file_for(storage.join(out, CAPTION_DB)) as dbpath:
        first = _load_npy(done[0][0].part("values.npy"))
        value_dim = first.shape[1]
        vals = np.lib.format.open_memmap(vpath, mode="w+", dtype=np.float32, shape=(len(keys), value_dim))
        row = 0
        for s, _ in done:
            part = first if s is done[0][0] else _load_npy(s.part("values.npy"))
            vals[row:row + len(part)] = part
            row += len(part)
        vals.flush()
        with ctx_h5.CaptionDbWriter(dbpath, settings.recipe, key_dim=keys.shape[1], value_dim=value_dim) as db:
            for start in range(0, len(keys), batch):
                db.add_batch(keys[start:start + batch], vals[start:start + batch], texts[start:start + batch])
        del vals
    index, info = make_index(keys, settings.index, use_gpu)
    with storage.local_file_for(storage.join(out, FAISS_INDEX)) as ipath:
        faiss.write_index(index, str(ipath))
    files = {rel: storage.sha256(storage.join(out, rel)) for rel in (CAPTION_DB, FAISS_INDEX, values_rel)}
    meta = {"fingerprint": fingerprint, "files": files, "value_dim": int(value_dim), "key_dim": int(keys.shape[1]),
            "values": values_rel, **info}
    storage.write_text(meta_uri, json.dumps(meta, indent=1, sort_keys=True))
    return {**meta, "skipped": False}


def read_index_meta(out: str) -> dict:
    try:
        return json.loads(storage.read_text(_index_meta_uri(out)))
    except FileNotFoundError:
        raise VlprepError(f"{_index_meta_uri(out)}: no index yet; run the index step first") from None


# ---------------------------------------------------------------- image encoding


def cut_views(im, rule: str) -> np.ndarray:
    """The 15 views of a PIL RGB image (whole, five crops, nine crops), resized and centre-cropped as
    ``vlprep.models.clip.preprocess`` does, as uint8 (15, 224, 224, 3); :func:`normalize` finishes them."""
    from vlprep.models import clip, crops

    views = [im] + crops.five_crops(im)[1] + crops.nine_crops(im)[1]
    out = np.empty((N_VIEWS, clip.IMAGE_SIZE, clip.IMAGE_SIZE, 3), np.uint8)
    for j, v in enumerate(views):
        v = clip.resize_short_side(v)
        out[j] = np.asarray(v.crop(clip.center_crop_box(*v.size, clip.IMAGE_SIZE, rule)), dtype=np.uint8)
    return out


def normalize(views, device: str = "cpu"):
    """uint8 (..., 224, 224, 3) -> float32 (..., 3, 224, 224) with the CLIP mean/std, on ``device``.

    The same element-wise operations as ``clip.preprocess`` (``/255``, ``- mean``, ``/ std`` in float32), so
    the values are bit-identical; done once per block (on the GPU when there is one) instead of per view
    in the loader workers, which then send 4x fewer bytes.
    """
    import torch

    from vlprep.models import clip

    x = torch.as_tensor(views).to(device, non_blocking=True)
    x = x.movedim(-1, -3).to(torch.float32) / 255.0
    mean = torch.tensor(clip.CLIP_MEAN, dtype=torch.float32, device=x.device)[:, None, None]
    std = torch.tensor(clip.CLIP_STD, dtype=torch.float32, device=x.device)[:, None, None]
    return ((x - mean) / std).contiguous()


class _Views:
    """torch Dataset: image i -> (i, uint8 (15, 224, 224, 3) views, note, size) or (i, None, error, None)."""

    def __init__(self, uris: Sequence[str], rule: str):
        self.uris, self.rule = list(uris), rule

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        uri = self.uris[i]
        try:
            bgr, note = imgs.decode_bgr(storage.read_bytes(uri), uri)
        except (imgs.BadImage, FileNotFoundError) as e:
            return i, None, str(e), None
        im = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
        return i, torch.from_numpy(cut_views(im, self.rule)), note, im.size


def _collate(batch):
    import torch

    ok = [(i, note, size) for i, px, note, size in batch if px is not None]
    failed = [(i, err) for i, px, err, _ in batch if px is None]
    views = torch.stack([px for _, px, _, _ in batch if px is not None]) if ok else None
    return {"ok": ok, "failed": failed, "views": views}


def _worker_init(_):
    # a gs:// client must not be shared across a fork: each worker makes its own
    storage._client = None


def image_loader(uris: Sequence[str], blocks: Sequence[Sequence[int]], rule: str, num_workers: int = 0,
                 pin_memory: bool = False):
    """A DataLoader yielding one dict per block: ``ok`` [(index, note, (w, h))], ``failed`` [(index, error)],
    ``views`` uint8 (m, 15, 224, 224, 3) or None."""
    from torch.utils.data import DataLoader

    return DataLoader(_Views(uris, rule), batch_sampler=[list(b) for b in blocks], num_workers=int(num_workers),
                      collate_fn=_collate, pin_memory=pin_memory, worker_init_fn=_worker_init if num_workers else None)


def encode_views(enc, views) -> dict[str, np.ndarray]:
    """uint8 (m, 15, 224, 224, 3) views -> the recipe's whole-image outputs and ``query`` (m, 15, d)."""
    pixels = normalize(views, enc.device)
    m = pixels.shape[0]
    whole = enc.encode_pixels(pixels[:, 0].contiguous())
    crops_q = enc.encode_pixels(pixels[:, 1:].reshape(m * (N_VIEWS - 1), *pixels.shape[2:]), ["query"])["query"]
    out = {k: v for k, v in whole.items() if k != "query"}
    out["query"] = np.concatenate([whole["query"][:, None], crops_q.reshape(m, N_VIEWS - 1, -1)], axis=1)
    return out


def encode_images(spec: dict, device: str = "auto", num_workers: int = 2) -> dict:
    """One image shard: visual context of each image and its 15 query vectors; bad images listed as failed.

    Parts: ``images.json`` (id, uri, block, size, note per encoded image), ``queries.npy`` (n, 15, d) and
    XC ``vis_ctx.npy`` (n, 768) or HV ``pooled.npy`` (n, 512) + ``grid.npy`` (n, 50, 768).
    """
    from vlprep.models.clip import get_recipe

    out = _out_of(spec)
    settings = read_settings(out)
    recipe = get_recipe(settings.recipe)
    dev = resolve_device(device)
    names = ["vis_ctx"] if recipe.vis_ctx == "cls" else ["pooled", "grid"]

    def work(shard: shards.Shard) -> dict:
        enc = encoder_for(settings, dev)
        uris, blocks, block_of = [], [], []
        for b, (_, block) in enumerate(shard.items):
            blocks.append(list(range(len(uris), len(uris) + len(block))))
            uris += block
            block_of += [b] * len(block)
        arrays: dict[str, list] = {n: [] for n in names + ["query"]}
        meta, failed = [], []
        loader = image_loader(uris, blocks, recipe.preprocess, num_workers, pin_memory=dev.startswith("cuda"))
        for batch in loader:
            failed += [{"item": uris[i], "error": err} for i, err in batch["failed"]]
            if not batch["ok"]:
                continue
            for name, arr in encode_views(enc, batch["views"]).items():
                arrays[name].append(arr)
            for i, note, (w, h) in batch["ok"]:
                meta.append({"key": image_key(uris[i]), "uri": uris[i], "block": block_of[i], "width": w, "height": h,
                             **({"note": note} if note else {})})
        dims = enc.dims
        parts = ["images.json"]
        storage.write_text(shard.part("images.json"), json.dumps(meta, indent=0, ensure_ascii=False))
        for name in names + ["query"]:
            arr = np.concatenate(arrays[name]) if arrays[name] else np.zeros(
                (0,) + ((N_VIEWS,) if name == "query" else ()) + tuple(dims[name]), np.float32)
            part = "queries.npy" if name == "query" else f"{name}.npy"
            _save_npy(shard.part(part), arr.astype(np.float32, copy=False))
            parts.append(part)
        for f in failed:
            log.warning("context: skipped %s (%s)", f["item"], f["error"])
        return {"parts": parts, "failed": failed, "images": len(meta), "device": dev,
                "random_weights": enc.is_random, "weights": {r: i.description for r, i in enc.loaded.items()}}

    return shards.run_shard(spec, work, f"{STAGE}/images", {"device": dev, "num_workers": int(num_workers),
                                                              **asdict(settings)})


# ---------------------------------------------------------------- retrieval


def _retrieval_fingerprint(out: str, settings: Settings, image_done) -> str:
    meta = read_index_meta(out)
    doc = [meta["fingerprint"], meta["files"], list(settings.topk), [m["parts"] for _, m in image_done]]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def plan_retrieval(out: str) -> list[dict]:
    """Once every image shard and the index are done: one retrieval shard per image shard (same blocks)."""
    settings = read_settings(out)
    image_plan = storage.join(work_dir(out), "images", "plan.json")
    image_done = shards.collect(image_plan)
    fp = _retrieval_fingerprint(out, settings, image_done)
    doc = json.loads(storage.read_text(image_plan))
    items = [[fp, block] for _, block in doc["items"]]
    specs = shards.plan(items, len(doc["bounds"]), storage.join(work_dir(out), "retrieve"), split=doc["split"])
    got = json.loads(storage.read_text(specs[0]["plan"]))["bounds"]
    if got != doc["bounds"]:  # cannot happen: same items, count and split give the same bounds
        raise VlprepError(f"{specs[0]['plan']}: retrieval shards do not line up with the image shards")
    return specs


def load_index(out: str, use_gpu: bool | None = None):
    """The saved faiss index (nprobe as built), moved to the GPUs when faiss sees any."""
    import faiss

    meta = read_index_meta(out)
    with storage.local_copy(storage.join(out, FAISS_INDEX)) as path:
        index = faiss.read_index(str(path))
    if meta.get("nprobe"):
        faiss.extract_index_ivf(index).nprobe = int(meta["nprobe"])
    gpus = _num_gpus() if use_gpu is None or use_gpu else 0
    if gpus:
        index = faiss.index_cpu_to_all_gpus(index)
        if meta.get("nprobe"):
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(meta["nprobe"]))
    return index, meta


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the top ``k`` keys per query (descending inner product); refuses missing results."""
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), int(k))
    if (ids < 0).any():
        raise VlprepError(f"the index returned fewer than {k} results for some queries (an IVF index with few "
                          "phrases per list); use index='flat' for a small corpus, or a smaller topk")
    return scores, ids


def retrieve(spec: dict, device: str = "auto") -> dict:
    """One retrieval shard: top-k row ids and scores for the whole image, each five- and nine-crop.

    Parts (n = images of the matching image shard): ``{view}_ids.npy`` int64 and ``{view}_scores.npy``
    float32, whole (n, k0), five (n, 5, k1), nine (n, 9, k2). One search per view per block.
    """
    out = _out_of(spec)
    settings = read_settings(out)
    use_gpu = None if device in ("", "auto") else device.startswith("cuda")

    def work(shard: shards.Shard) -> dict:
        image_shard = shards.load({"index": shard.index, "count": shard.count,
                                   "plan": storage.join(work_dir(out), "images", "plan.json")})
        if shards.verify(image_shard) is None:
            raise VlprepError(f"{image_shard.marker}: image shard {shard.index} is not done; run image encoding first")
        meta = json.loads(storage.read_text(image_shard.part("images.json")))
        queries = _load_npy(image_shard.part("queries.npy"))
        index, info = load_index(out, use_gpu)
        k_whole, k_five, k_nine = settings.topk
        res = {f"{v}_{t}": [] for v in VIEWS for t in ("ids", "scores")}
        blocks = np.array([e["block"] for e in meta], dtype=np.int64)
        for b in sorted(set(blocks.tolist())):
            q = queries[blocks == b]
            m = len(q)
            for view, sl, n, k in (("whole", slice(0, 1), 1, k_whole), ("five", slice(1, 6), 5, k_five),
                                   ("nine", slice(6, 15), 9, k_nine)):
                scores, ids = search(index, q[:, sl].reshape(m * n, -1), k)
                shape = (m, k) if view == "whole" else (m, n, k)
                res[f"{view}_ids"].append(ids.reshape(shape).astype(np.int64))
                res[f"{view}_scores"].append(scores.reshape(shape).astype(np.float32))
        parts = []
        for name, chunks in res.items():
            view = name.split("_")[0]
            k = dict(zip(VIEWS, settings.topk, strict=True))[view]
            lead = (0, k) if view == "whole" else (0, 5 if view == "five" else 9, k)
            dtype = np.int64 if name.endswith("ids") else np.float32
            arr = np.concatenate(chunks) if chunks else np.zeros(lead, dtype)
            _save_npy(shard.part(f"{name}.npy"), arr)
            parts.append(f"{name}.npy")
        return {"parts": parts, "failed": [], "images": len(meta), "index": info["factory"],
                "gpu": bool(_num_gpus() and use_gpu is not False)}

    return shards.run_shard(spec, work, f"{STAGE}/retrieve", {"device": device, "topk": list(settings.topk)})


# ---------------------------------------------------------------- merge


def merge(out: str, report_samples: int = 4) -> dict:
    """``vis_ctx.hdf5`` and ``txt_ctx.hdf5`` (images sorted by id) from the verified shards, and the report."""
    from vlprep.formats import ctx_h5
    from vlprep.models.clip import get_recipe

    settings = read_settings(out)
    recipe = get_recipe(settings.recipe)
    image_done = shards.collect(storage.join(work_dir(out), "images", "plan.json"))
    ret_plan = storage.join(work_dir(out), "retrieve", "plan.json")
    ret_done = shards.collect(ret_plan)
    want = _retrieval_fingerprint(out, settings, image_done)
    items = json.loads(storage.read_text(ret_plan))["items"]
    if len(ret_done) != len(image_done) or (items and items[0][0] != want):
        raise VlprepError(f"{ret_plan}: the retrieval shards are older than the image shards or the index; "
                          "rerun the retrieval plan and retrieval")
    meta = read_index_meta(out)
    texts = read_phrase_file(storage.join(out, PHRASES))
    names = ["vis_ctx"] if recipe.vis_ctx == "cls" else ["pooled", "grid"]
    ret_names = [f"{v}_{t}" for v in VIEWS for t in ("ids", "scores")]
    failed = [f for _, m in image_done for f in m["failed"]]
    random_weights = any(m.get("random_weights") for _, m in image_done)
    weights = next((m["weights"] for _, m in image_done if m.get("weights")), {})

    with contextlib.ExitStack() as stack:
        def mapped(uri: str) -> np.ndarray:
            path = stack.enter_context(storage.local_copy(uri))
            try:
                return np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError:  # an empty array (a shard of only bad images) cannot be mapped
                return np.load(path, allow_pickle=False)

        values = mapped(storage.join(out, meta["values"]))
        entries, arrays = [], []
        for (ishard, _), (rshard, _) in zip(image_done, ret_done, strict=True):
            rows = json.loads(storage.read_text(ishard.part("images.json")))
            a = {n: mapped(ishard.part(f"{n}.npy")) for n in names}
            a.update({n: mapped(rshard.part(f"{n}.npy")) for n in ret_names})
            if any(len(v) != len(rows) for v in a.values()):
                raise VlprepError(f"{rshard.marker}: parts do not match image shard {ishard.index}; rerun retrieval")
            arrays.append(a)
            entries += [(key_order(e["key"]), len(arrays) - 1, r, e) for r, e in enumerate(rows)]
        entries.sort(key=lambda t: t[0])

        def retrieved(a: dict, r: int, view: str) -> ctx_h5.Retrieved:
            ids = np.asarray(a[f"{view}_ids"][r])
            return ctx_h5.Retrieved(values[ids.reshape(-1)].reshape(ids.shape + (values.shape[1],)),
                                    np.asarray(a[f"{view}_scores"][r]),
                                    [texts[j] for j in ids] if ids.ndim == 1 else [[texts[j] for j in row] for row in ids])

        samples = []
        with storage.local_file_for(storage.join(out, VIS_CTX)) as vpath, \
                storage.local_file_for(storage.join(out, TXT_CTX)) as tpath:
            first = arrays[0] if entries else None
            if recipe.vis_ctx == "cls":
                fdim = first["vis_ctx"].shape[1] if first is not None else recipe.dims["vis_ctx"][0]
                vis = ctx_h5.XcVisCtxWriter(vpath, fdim=fdim)
            else:
                fp = first["pooled"].shape[1] if first is not None else recipe.dims["pooled"][0]
                fg = first["grid"].shape[2] if first is not None else recipe.dims["grid"][1]
                vis = ctx_h5.HvVisCtxWriter(vpath, fdim_pooled=fp, fdim_grid=fg)
            txt = ctx_h5.TxtCtxWriter(tpath, settings.recipe, topk=settings.topk, fdim=values.shape[1])
            with vis, txt:
                for _, s, r, e in entries:
                    a = arrays[s]
                    if recipe.vis_ctx == "cls":
                        vis.add(e["key"], a["vis_ctx"][r])
                    else:
                        vis.add(e["key"], a["pooled"][r], a["grid"][r])
                    views = {v: retrieved(a, r, v) for v in VIEWS}
                    txt.add(e["key"], views["whole"], views["five"], views["nine"])
                    if len(samples) < report_samples:
                        samples.append({"key": e["key"], "uri": e["uri"], "size": [e["width"], e["height"]],
                                        "views": {v: {"texts": views[v].texts, "scores": views[v].scores.tolist()}
                                                  for v in VIEWS}})
    summary = {
        "stage": STAGE,
        "out": out,
        "recipe": settings.recipe,
        "images": len(entries),
        "failed": failed,
        "phrases": len(texts),
        "index": meta["factory"],
        **({"nprobe": meta["nprobe"]} if meta.get("nprobe") else {}),
        "topk": list(settings.topk),
        "random_weights": random_weights,
        "weights": weights,
        "shards": {"images": len(image_done), "retrieval": len(ret_done)},
        "files": {rel: storage.join(out, rel) for rel in (VIS_CTX, TXT_CTX, CAPTION_DB, FAISS_INDEX, PHRASES, REPORT)},
    }
    storage.write_text(storage.join(out, REPORT), report_html(summary, samples))
    return summary


# ---------------------------------------------------------------- report


def _top_table(title: str, texts: list, scores: list, n: int = 3) -> str:
    rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{s:.3f}</td></tr>" for t, s in list(zip(texts, scores, strict=True))[:n])
    return (f"<table style='display:inline-block;vertical-align:top;margin:4px'>"
            f"<tr><th colspan=2>{html.escape(title)}</th></tr>{rows}</table>")


def report_html(summary: dict, samples: list[dict], top: int = 3) -> str:
    """The run report: counts, skipped images, and each sample with its crops drawn and their top phrases."""
    from vlprep import report
    from vlprep.models import crops

    parts = []
    if summary["random_weights"]:
        parts.append("<p><b>RANDOM weights: these phrases are not meaningful (a test or demo run).</b></p>")
    info = [{"what": k, "value": html.escape(str(summary.get(k, "-")))}
            for k in ("recipe", "images", "phrases", "index", "nprobe", "topk")]
    info += [{"what": f"weights ({r})", "value": html.escape(d)} for r, d in summary["weights"].items()]
    parts.append(_html_table(info))
    parts.append(f"<h2>Skipped images ({len(summary['failed'])})</h2>")
    parts.append("<ul>" + "".join(f"<li><code>{html.escape(f['item'])}</code>: {html.escape(f['error'])}</li>"
                                  for f in summary["failed"]) + "</ul>" if summary["failed"] else "<p>none</p>")
    for s in samples:
        parts.append(f"<h2>image {html.escape(str(s['key']))}</h2><p><code>{html.escape(s['uri'])}</code></p>")
        w, h = s["size"]
        try:
            bgr, _ = imgs.decode_bgr(storage.read_bytes(s["uri"]), s["uri"])
            rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        except (imgs.BadImage, FileNotFoundError):
            rgb = None
        v = s["views"]
        parts.append("<div>" + _top_table("whole image", v["whole"]["texts"], v["whole"]["scores"], top) + "</div>")
        for view, boxes in (("five", crops.five_crop_boxes(w, h)), ("nine", crops.nine_crop_boxes(w, h))):
            labels = [str(i + 1) for i in range(len(boxes))]
            if rgb is not None:
                uri = report.png_data_uri(report.draw_boxes(rgb, boxes, labels))
                parts.append(f"<figure><img src='{uri}'><figcaption>{view} crops</figcaption></figure>")
            parts.append("<div>" + "".join(
                _top_table(f"{view} crop {i + 1}", v[view]["texts"][i], v[view]["scores"][i], top)
                for i in range(len(boxes))) + "</div>")
    return report.html_page(f"Cross-modal context ({summary['recipe']})", "\n".join(parts))


def _html_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{r[c]}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# ---------------------------------------------------------------- everything in one process


def run(images: str, attributes: str, relationships: str, out: str, recipe: str = "xmodal-ctx",
        weights: str = "openai", text_weights: str = "", model_cfg=None, index: str = "ivf", topk=None,
        image_shards: int = 1, phrase_shards: int = 1, image_batch: int = 0, text_batch: int = 0,
        encode_batch: int = 256, device: str = "auto", num_workers: int = 2, attribute_leak: bool = True,
        image_root: str = "") -> dict:
    """The whole stage in one process: plan, every shard (done ones skipped), index, retrieval, merge."""
    p = plan(attributes, relationships, out, phrase_shards, recipe, weights, text_weights, model_cfg, index, topk,
             image_batch, text_batch, encode_batch, attribute_leak)
    image_specs = plan_images(images, out, image_shards, image_root)
    skipped = {"phrases": 0, "images": 0, "retrieval": 0}
    for spec in p["phrases"]:
        skipped["phrases"] += encode_phrases(spec, device)["skipped"]
    idx = build_index(out)
    for spec in image_specs:
        skipped["images"] += encode_images(spec, device, num_workers)["skipped"]
    rspecs = plan_retrieval(out)
    for spec in rspecs:
        skipped["retrieval"] += retrieve(spec, device)["skipped"]
    summary = merge(out)
    summary["skipped_shards"] = skipped
    summary["index_skipped"] = idx["skipped"]
    return summary


# ---------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    """``vlprep ctx phrases ...`` and ``vlprep ctx run ...``."""
    ctx = subparsers.add_parser("ctx", help="cross-modal context (Xmodal-Ctx / HAAV): VG phrases, CLIP, faiss")
    sub = ctx.add_subparsers(dest="ctx_command", required=True)

    s = sub.add_parser("phrases", help="the Visual Genome phrase list (caption DB rows), one per line")
    s.add_argument("--attributes", required=True, help="VG attributes.json (path or gs://)")
    s.add_argument("--relationships", required=True, help="VG relationships.json (path or gs://)")
    s.add_argument("--out", required=True, help="output file or gs:// URI")
    s.add_argument("--no-attribute-leak", action="store_true",
                   help="do not reproduce upstream's shared attribute sets (see vlprep.data.visual_genome)")
    s.set_defaults(func=cmd_phrases)

    s = sub.add_parser("run", help="vis_ctx.hdf5, caption_db.hdf5, faiss.index and txt_ctx.hdf5 in one process")
    s.add_argument("--images", required=True, help="image folder, list file (.txt) or Karpathy split file (.json)")
    s.add_argument("--image-root", default="", help="with a Karpathy file: the folder its filepaths are under")
    s.add_argument("--attributes", required=True)
    s.add_argument("--relationships", required=True)
    s.add_argument("--out", required=True, help="output directory or gs:// prefix")
    s.add_argument("--recipe", default="xmodal-ctx", choices=["xmodal-ctx", "haav"])
    s.add_argument("--weights", default="openai",
                   help="CLIP weights: open_clip tag (openai), checkpoint file/URL, or random:SEED")
    s.add_argument("--text-weights", default="", help="haav: weights of the ViT-L-14 text model (default --weights)")
    s.add_argument("--model-cfg", default="", help="'tiny' or an open_clip model config JSON (tests)")
    s.add_argument("--index", default="ivf", choices=INDEX_KINDS, help="ivf (upstream) or flat (exact, small corpora)")
    s.add_argument("--topk", default="", help="whole,five,nine (default: the recipe's)")
    s.add_argument("--device", default="auto")
    s.add_argument("--image-shards", type=int, default=1)
    s.add_argument("--phrase-shards", type=int, default=1)
    s.add_argument("--image-batch", type=int, default=0, help="images per block (default: the recipe's 32)")
    s.add_argument("--text-batch", type=int, default=0, help="phrases per block (default 512)")
    s.add_argument("--encode-batch", type=int, default=256, help="views or phrases per forward pass")
    s.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    s.add_argument("--no-attribute-leak", action="store_true")
    s.set_defaults(func=cmd_run)


def cmd_phrases(args: argparse.Namespace) -> int:
    summary = phrases(args.attributes, args.relationships, args.out, attribute_leak=not args.no_attribute_leak)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    summary = run(args.images, args.attributes, args.relationships, args.out, recipe=args.recipe, weights=args.weights,
                  text_weights=args.text_weights, model_cfg=args.model_cfg, index=args.index, topk=args.topk,
                  image_shards=args.image_shards, phrase_shards=args.phrase_shards, image_batch=args.image_batch,
                  text_batch=args.text_batch, encode_batch=args.encode_batch, device=args.device,
                  num_workers=args.num_workers, attribute_leak=not args.no_attribute_leak, image_root=args.image_root)
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0
