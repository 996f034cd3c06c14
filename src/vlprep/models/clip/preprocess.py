"""Image preprocessing as each upstream did it (see the package docstring)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vlprep import VlprepError
from vlprep.models.clip.recipes import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, PREPROCESS_HF417, PREPROCESS_OPENAI


def resize_short_side(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Short side to ``size``, long side ``int(size * long / short)``, PIL bicubic (HF 4.17 = torchvision)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop_box(width: int, height: int, size: int, rule: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre crop under ``rule`` (see the module docstring)."""
    if rule == PREPROCESS_HF417:
        top, left = int((height - size + 1) * 0.5), int((width - size + 1) * 0.5)
    elif rule == PREPROCESS_OPENAI:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    else:
        raise VlprepError(f"unknown preprocessing {rule!r}; use {PREPROCESS_HF417!r} or {PREPROCESS_OPENAI!r}")
    return left, top, left + size, top + size


def preprocess(image: Image.Image, rule: str, size: int = IMAGE_SIZE) -> torch.Tensor:
    """One PIL image -> (3, size, size) float32, normalized with the CLIP mean/std.

    The centre-crop offset of an odd margin ``d = H - 224`` differs between implementations:
    HF 4.17 ``CLIPFeatureExtractor`` (XC) takes ``ceil(d / 2)``, torchvision / ``clip`` / open_clip (HV)
    ``round(d / 2)`` half to even, and today's transformers (5.x ``CLIPImageProcessor``, both backends)
    ``floor(d / 2)``. Measured on one photo: a 640x427 COCO image (resized to 335x224) gives XC = HV
    but HF 5.x one pixel off (max abs diff 1.3 after normalization); 640x458 gives XC one pixel off HV
    and HF 5.x. HF 5.x's default (torchvision) backend also resizes tensors with antialiased bicubic,
    which differs from PIL's bicubic by up to ~1.5e-2 even where the crop agrees. open_clip's eval
    transform equals the ``openai`` rule here exactly (max abs diff 0).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = resize_short_side(image, size)
    image = image.crop(center_crop_box(*image.size, size, rule))
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).to(torch.float32) / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std
