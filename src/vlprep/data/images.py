"""Image sources and robust decoding.

A source is one of:
- a directory or gs:// prefix: every image file under it (``.jpg .jpeg .png``), e.g. a COCO root with
  ``train2014/ val2014/ test2015/`` or a Flickr30k ``images/`` folder;
- a list file (``.txt``): one path per line, relative to the list's folder unless absolute/URI;
- a Karpathy split file (``.json``): ``filepath/filename`` of every entry, relative to ``image_root``.

Items are URIs, sorted (upstream used unsorted ``os.listdir``).

Decoding never crashes a shard: an undecodable file (corrupt, truncated, zero bytes, not an image)
raises ``BadImage`` which callers record as a failed item; grayscale, CMYK, palette and
mislabelled (e.g. PNG named .jpg) images are decoded by content and converted to 3 channels, with a note.
"""

from __future__ import annotations

import io
import warnings
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from vlprep import VlprepError, storage

EXTS = (".jpg", ".jpeg", ".png")
_EXT_OF = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",)}


class BadImage(Exception):
    """An image file that cannot be decoded; the message says why."""


def _rel(base: str, path: str) -> str:
    if storage.is_gcs(path) or path.startswith("/"):
        return path
    return storage.join(storage.parent(base), path)


def list_images(source: str, image_root: str = "") -> list[str]:
    source = str(source)
    if source.endswith(".json"):
        import json

        doc = json.loads(storage.read_text(source))
        root = image_root or storage.parent(source)
        try:
            items = [storage.join(root, e.get("filepath", ""), e["filename"]) for e in doc["images"]]
        except (KeyError, TypeError) as e:
            raise VlprepError(f"{source}: not a Karpathy split file (missing {e}); pass an image folder instead") from None
    elif source.endswith(".txt"):
        items = [_rel(source, line.strip()) for line in storage.read_text(source).splitlines() if line.strip()]
    else:
        items = [p for p in storage.list_prefix(source) if p.lower().endswith(EXTS)]
        if not items:
            raise VlprepError(f"{source}: no .jpg/.jpeg/.png files found; pass an image folder, list or Karpathy file")
    return sorted(set(items))


def decode_bgr(data: bytes, name: str = "") -> tuple[np.ndarray, str]:
    """uint8 BGR HxWx3 from encoded bytes (as cv2.imread gives), and a note ('' when nothing was odd)."""
    if not data:
        raise BadImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            im.load()  # raises on truncated data
    except Exception as e:
        raise BadImage(f"cannot decode ({e.__class__.__name__}: {e})") from None
    notes = []
    ext = PurePosixPath(name).suffix.lower()
    if ext in EXTS and ext not in _EXT_OF.get(fmt, ()):
        notes.append(f"{fmt} data in a {ext} file")
    if im.mode != "RGB":
        notes.append(f"converted from {im.mode}")
        im = im.convert("RGB")
    if im.width < 2 or im.height < 2:
        raise BadImage(f"image is {im.width}x{im.height}")
    rgb = np.asarray(im)
    return np.ascontiguousarray(rgb[:, :, ::-1]), "; ".join(notes)
