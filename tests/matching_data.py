"""Synthetic data for the matcher tests: a small WordPiece vocabulary, shape images, captions, corpora."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
          "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 40, 160), "orange": (240, 140, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
WORDS = ("a", "an", "the", "on", "of", "with", "and", "big", "small", "shape", "picture", "background", "is",
         "hello", "world", "end", "dog", "cat", "i", "you", "how", "are", "fine", "thanks", "!", "?", ",", ".", "'")


def write_vocab(folder: Path) -> Path:
    """A bert-style vocab.txt ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103) and tokenizer config."""
    folder.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    pieces = [f"##{c}" for c in letters]
    words = sorted(set(WORDS) | set(COLORS) | set(SHAPES) | {"[", "]", "-", ":", "/"})
    vocab = special + words + [c for c in letters if c not in words] + pieces
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512,
                                                              "tokenizer_class": "BertTokenizer"}))
    return folder


def shape_image(color: str, shape: str, size=(96, 80), seed: int = 0) -> Image.Image:
    """A ``shape`` on a background of ``color`` (so that any crop shows the color), with a little noise."""
    rs = np.random.RandomState(seed)
    base = np.array(COLORS[color], dtype=np.float64)
    noise = rs.normal(0, 12, (size[1], size[0], 3))
    im = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    w, h = size
    box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
    fill = tuple(int(v) for v in (base * 0.5 + 127) % 256)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(w * 0.5, h * 0.15), (w * 0.85, h * 0.85), (w * 0.15, h * 0.85)], fill=fill)
    else:
        d.rectangle((w * 0.42, h * 0.1, w * 0.58, h * 0.9), fill=fill)
        d.rectangle((w * 0.1, h * 0.42, w * 0.9, h * 0.58), fill=fill)
    return im


def coco_like(root: Path, split: str, n: int, start: int = 1) -> list[dict]:
    """n shape images under root/{split}/COCO_{split}_{id:012d}.jpg and their LXMERT entries."""
    (root / split).mkdir(parents=True, exist_ok=True)
    entries = []
    colors, shapes = list(COLORS), list(SHAPES)
    for k in range(start, start + n):
        color, shape = colors[k % len(colors)], shapes[(k // len(colors)) % len(shapes)]
        img_id = f"COCO_{split}_{k:012d}"
        shape_image(color, shape, seed=k).save(root / split / f"{img_id}.jpg", quality=95)
        sents = [f"a {color} {shape}", f"the {shape} is {color}", f"a big {color} {shape} on a background"]
        entries.append({"img_id": img_id, "sentf": {"mscoco": sents, "vqa": ["is it ok?"]}, "labelf": {}})
    return entries
