"""What a context run computes (fixed at plan time), its output names, and its CLIP encoder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from vlprep import VlprepError, index, stage

VIEWS = ("whole", "five", "nine")
N_VIEWS = 15  # whole + 5 + 9 per image
INDEX_KINDS = index.KINDS

# A tiny model in the real (OpenAI ViT) architecture, for tests and quick demos (``model_cfg="tiny"``).
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

# outputs, relative to ``out`` = the captioning model's --dataset_root: XC m2/train.py and HAAV haav/train.py,
# test.py open ``dataset_root/vis_ctx.hdf5`` and ``dataset_root/txt_ctx.hdf5`` (upstream links them there by hand)
VIS_CTX = "vis_ctx.hdf5"
PHRASES = "captions_db/vg_phrases.txt"
CAPTION_DB = "captions_db/caption_db.hdf5"
FAISS_INDEX = "retrieved_captions/faiss.index"
TXT_CTX = "txt_ctx.hdf5"
REPORT = "context_report.html"


@dataclass(frozen=True)
class Settings(stage.Settings):
    """Normalized by :func:`make_settings` (defaults filled in from the recipe)."""

    images: str  # image folder, list file (.txt) or Karpathy split file (.json)
    image_root: str  # with a Karpathy file: the folder its filepaths are under
    attributes: str  # VG attributes.json
    relationships: str  # VG relationships.json
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
    weights_fallback: str = ""  # why the plan turned default into random:0 ("" = it did not)


# what each fan-out's shards depend on (its marker fingerprint)
IMAGE_FIELDS = ("recipe", "weights", "text_weights", "model_cfg", "image_batch", "encode_batch")
TEXT_FIELDS = ("recipe", "weights", "text_weights", "model_cfg", "text_batch", "encode_batch")

STAGE = stage.Stage("context", Settings)


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


def make_settings(*, images: str, attributes: str, relationships: str, image_root: str = "",
                  recipe: str = "xmodal-ctx", weights: str = "default", text_weights: str = "", model_cfg=None,
                  index: str = "ivf", topk=None, image_batch: int = 0, text_batch: int = 0, encode_batch: int = 256,
                  attribute_leak: bool = True) -> Settings:
    """Settings from user values (by name): ``0`` batch sizes and an empty ``topk`` take the recipe's."""
    # one keyword per setting: the CLI, the plan component and tests all name them
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
        images=str(images), image_root=str(image_root or ""), attributes=str(attributes),
        relationships=str(relationships), recipe=r.name, weights=str(weights), text_weights=str(text_weights or ""),
        model_cfg=parse_model_cfg(model_cfg), index=index, topk=parse_topk(topk, r),
        image_batch=int(image_batch) or r.image_batch, text_batch=int(text_batch) or r.caption_batch,
        encode_batch=int(encode_batch) or 256, attribute_leak=bool(attribute_leak),
    )


def pin_weights(settings: Settings) -> Settings:
    """The settings with ``default`` weights made concrete once, at plan time (the published file pinned
    ``#sha256=``, or random:0 with ``weights_fallback`` saying why), so every shard loads the same models."""
    from vlprep.models.clip import get_recipe
    from vlprep.models.clip import pin_weights as pin

    r = get_recipe(settings.recipe)
    weights, why = pin(settings.weights, r.image_model, settings.model_cfg)
    text_weights, text_why = settings.text_weights, ""
    if r.text_model != r.image_model:  # haav: its own text model; a spec it shares with images stays ""
        given = settings.text_weights or settings.weights
        pinned, text_why = pin(given, r.text_model, settings.model_cfg)
        text_weights = pinned if pinned != given else settings.text_weights
    reasons = "; ".join(dict.fromkeys(w for w in (why, text_why) if w))
    return dataclasses.replace(settings, weights=weights, text_weights=text_weights,
                               weights_fallback=reasons or settings.weights_fallback)


def encoder_for(settings: Settings, device: str):
    """The recipe's ``ClipContextEncoder`` (one kept per process, so a local run loads the models once)."""
    from vlprep.models.clip import ClipContextEncoder, get_recipe

    def load():
        r = get_recipe(settings.recipe)
        weights = settings.weights if r.image_model == r.text_model else {
            "image": settings.weights, "text": settings.text_weights or settings.weights}
        return ClipContextEncoder(r, weights=weights, model_cfg=settings.model_cfg, device=device,
                                  batch_size=settings.encode_batch)

    key = ("clip", settings.recipe, settings.weights, settings.text_weights,
           json.dumps(settings.model_cfg, sort_keys=True), device, settings.encode_batch)
    return stage.cached_model(key, load)
