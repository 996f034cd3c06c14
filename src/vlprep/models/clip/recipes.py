"""Recipes: the two upstream context set-ups (xmodal-ctx, haav) and the CLIP constants."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vlprep import VlprepError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224

PREPROCESS_HF417 = "hf-4.17"  # transformers 4.17 CLIPFeatureExtractor (xmodal-ctx)
PREPROCESS_OPENAI = "openai"  # clip.load transform = torchvision Resize/CenterCrop (haav, open_clip)

XC_TOKEN_LIMIT = 75  # collate_tokens' LENGTH_LIMIT
CONTEXT_LENGTH = 77


@dataclass(frozen=True)
class Recipe:
    """What one upstream computes: models, outputs, top-k and preprocessing."""

    name: str
    image_model: str  # open_clip architecture of the visual context
    text_model: str  # architecture of caption keys/values and image queries
    topk: tuple[int, int, int]  # retrieved captions per whole image, per five-crop, per nine-crop
    vis_ctx: str  # "cls" (XC: ln_post(CLS), unprojected) or "pooled_grid" (HV: projected CLS + raw tokens)
    preprocess: str  # PREPROCESS_HF417 or PREPROCESS_OPENAI
    tokenizer: str  # "hf-75" (HF slow tokenizer, cut to 75) or "openai-77" (clip.tokenize)
    values_after_ln_final: bool  # caption values taken after (XC) or before (HV) ln_final
    dims: Mapping[str, tuple[int, ...]]  # output shapes of the full-size models, per item
    caption_values_name: str  # dataset name of the values in caption_db.hdf5
    caption_batch: int = 512
    image_batch: int = 32


XMODAL_CTX = Recipe(
    name="xmodal-ctx",
    image_model="ViT-B-32",
    text_model="ViT-B-32",
    topk=(16, 16, 16),
    vis_ctx="cls",
    preprocess=PREPROCESS_HF417,
    tokenizer="hf-75",
    values_after_ln_final=True,
    dims={"vis_ctx": (768,), "query": (512,), "key": (512,), "value": (512,)},
    caption_values_name="features",
)
HAAV = Recipe(
    name="haav",
    image_model="ViT-B-32",
    text_model="ViT-L-14",
    topk=(128, 32, 16),
    vis_ctx="pooled_grid",
    preprocess=PREPROCESS_OPENAI,
    tokenizer="openai-77",
    values_after_ln_final=False,
    dims={"pooled": (512,), "grid": (50, 768), "query": (768,), "key": (768,), "value": (768,)},
    caption_values_name="values",
)
RECIPES = {r.name: r for r in (XMODAL_CTX, HAAV)}


def get_recipe(name: str | Recipe) -> Recipe:
    if isinstance(name, Recipe):
        return name
    try:
        return RECIPES[name]
    except KeyError:
        raise VlprepError(f"unknown context recipe {name!r}; use one of {', '.join(RECIPES)}") from None
