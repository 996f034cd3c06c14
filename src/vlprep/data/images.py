"""Image sources and robust decoding.

A source is one of:
- a directory or gs:// prefix: every image file under it (``.jpg .jpeg .png``), e.g. a COCO root with
  ``train2014/ val2014/ test2015/`` or a Flickr30k ``images/`` folder;
- a list file (``.txt``): one path per line, relative to ``image_root`` (default: the list's folder) unless
  absolute or a URI (kept as they are: the list names their place; with an ``image_root``, they too must
  lie under it);
- a Karpathy split file (``.json``): ``filepath/filename`` of every entry, relative to ``image_root``
  (default: the file's folder).

Items are URIs, sorted (upstream used unsorted ``os.listdir``). A relative path that leaves its root
(``../``, an absolute ``filepath``) and a path listed twice refuse the run before anything is opened;
symlink loops, dangling links and file names that are not UTF-8 are listed and fail when read, with
the reason (``vlprep.data.image_paths``).

Decoding never crashes a shard: an undecodable file (corrupt, truncated, zero bytes, not an image)
raises ``BadImage`` which callers record as a failed item; grayscale, CMYK, palette and
mislabelled (e.g. PNG named .jpg) images are decoded by content and converted to 3 channels, with a note;
16-bit greys are scaled to 8 bits (not clipped).

EXIF orientation is a per-recipe policy, as each reference read its images:

| reference | reads with | EXIF orientation | our recipes |
| --- | --- | --- | --- |
| py-bottom-up-attention (detectron2 recipes), BUTD generate_tsv.py | ``cv2.imread`` | applied (OpenCV >= 3.1) | every BUTD recipe: ``exif=True`` |
| X-LXMERT, Xmodal-Ctx / HAAV, Maria | ``PIL.Image.open`` | not applied | ``exif=False`` |

Which OpenCV the original Caffe BUTD images ran is not known; the Caffe recipes follow today's cv2.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlprep import VlprepError, storage
from vlprep.data import image_paths

EXTS = (".jpg", ".jpeg", ".png")
_EXT_OF = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",)}
ORIENTATION_TAG = 0x0112


class BadImage(Exception):
    """An image file that cannot be decoded; the message says why."""


def list_images(source: str, image_root: str = "") -> list[str]:
    """Sorted image URIs of a folder / prefix, a list file or a Karpathy file (see the module doc).

    Paths from a file stay under their root (``image_root``, else the file's folder) and each image is
    named once: an escaping or repeated path refuses the run, naming the entries, before any is opened."""
    source = str(source)
    if source.endswith(".json"):
        return sorted(_resolve(source, image_root or storage.parent(source), _karpathy_paths(source)))
    if source.endswith(".txt"):
        return sorted(_resolve(source, image_root or storage.parent(source), _list_lines(source),
                               confine_absolute=bool(image_root)))
    if storage.is_remote(source):
        items = [p for p in storage.list_prefix(source) if p.lower().endswith(EXTS)]
    else:
        items = image_paths.walk_local(source, EXTS)
    if not items:
        raise VlprepError(f"{source}: no .jpg/.jpeg/.png files found; pass an image folder, list or Karpathy file")
    return sorted(items)


def _karpathy_paths(source: str) -> list[tuple[str, str, bool]]:
    """``(entry label, path below the root, False)`` of every entry of a Karpathy split file."""
    try:
        doc = json.loads(storage.read_text(source))
    except FileNotFoundError:
        raise VlprepError(f"{source}: no such file; pass a Karpathy split file, a list file or an image folder") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise VlprepError(f"{source}: not a Karpathy split file ({str(e)[:120]}); re-download it") from None
    entries = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise VlprepError(f"{source}: not a Karpathy split file (no 'images' list); pass an image folder instead")
    out = []
    for i, e in enumerate(entries):
        path, name = (e.get("filepath", ""), e.get("filename")) if isinstance(e, dict) else (None, None)
        if not isinstance(path, str) or not isinstance(name, str) or not name:
            raise VlprepError(f"{source}: not a Karpathy split file (images[{i}] needs a string 'filename' and "
                              "optional 'filepath'); pass an image folder instead")
        out.append((f"images[{i}]", image_paths.relative(path, name), False))
    return out


def _list_lines(source: str) -> list[tuple[str, str, bool]]:
    """``(line label, path, absolute)`` of every non-blank line: an absolute path or a URI names its own
    place (kept as it is), any other line is below the root."""
    out = []
    for n, line in enumerate(storage.read_text(source).splitlines(), 1):
        path = line.strip()
        if path:
            out.append((f"line {n}", path, path.startswith("/") or storage.is_remote(path)))
    return out


def _resolve(source: str, root: str, named: list[tuple[str, str, bool]], confine_absolute: bool = False) -> list[str]:
    """The URIs of ``(label, path, absolute)`` entries (relative ones below ``root``; absolute ones too with
    ``confine_absolute``: a list file given an ``--image-root``); refuses escaping or repeated paths."""
    uris, escaping, first, repeated = [], [], {}, []
    for label, path, absolute in named:
        if absolute:
            uri = path if storage.is_remote(path) else os.path.normpath(path)
            if confine_absolute and not _inside(uri, root):
                uri = None
        else:
            uri = image_paths.confine(root, path)
        if uri is None:
            escaping.append(f"{label} {path!r}")
        elif uri in first:
            repeated.append(f"{first[uri]} and {label} ({uri})")
        else:
            first[uri] = label
            uris.append(uri)
    if escaping:
        raise VlprepError(
            f"{source}: {len(escaping)} image path(s) leave the image root {root}: {image_paths.few(escaping)}; "
            "paths in this file must be relative and stay under the root (fix or drop those entries, or set "
            "the root with --image-root); nothing was opened")
    if repeated:
        raise VlprepError(f"{source}: {len(repeated)} image(s) listed twice: {image_paths.few(repeated)}; each image "
                          "must appear once, drop the repeated entries")
    return uris


def _inside(uri: str, root: str) -> bool:
    base = root.rstrip("/") if storage.is_remote(root) else os.path.normpath(root).rstrip(os.sep)
    return uri.startswith(base + "/")


def read_image(uri: str) -> bytes:
    """The encoded bytes of an image; a file that cannot be read raises :class:`BadImage` saying why
    (no such file, a dangling link, a symlink loop, a name that is not UTF-8)."""
    try:
        return storage.read_bytes(uri)
    except OSError as e:  # FileNotFoundError included
        raise BadImage(image_paths.why_unreadable(uri, e)) from None


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Any decoded mode to 8-bit RGB with the right pixels: 16-bit and 32-bit greys are scaled, not clipped."""
    if im.mode == "RGB":
        return im
    notes.append(f"converted from {im.mode}")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode != "I" or grey.max(initial=0) <= 65535 else float(grey.max())
        grey = np.clip(np.rint(grey * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "F":  # float greys: 0..1 if they fit, else 0..255
        grey = np.asarray(im).astype(np.float64)
        scale = 255.0 if grey.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(grey * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")  # L, LA, P, PA, RGBA, CMYK, YCbCr, 1: as PIL's default loaders do


def decode_pil(data: bytes, name: str = "", *, exif: bool = False) -> tuple[Image.Image, str]:
    """An 8-bit RGB PIL image from encoded bytes, and a note ('' when nothing was odd).

    The one decoder: every stage decodes through it (as arrays via :func:`decode_rgb` /
    :func:`decode_bgr`, or as PIL images for torchvision transforms). ``exif``: apply the JPEG EXIF
    orientation, as ``cv2.imread`` does since OpenCV 3.1; off, the pixels are as stored, as
    ``PIL.Image.open`` gives them (X-LXMERT, Xmodal-Ctx, Maria). Each recipe states its policy (see the
    module docstring). Raises :class:`BadImage` with a stable reason.
    """
    if not data:
        raise BadImage("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            im.load()  # raises on truncated data
    except UnidentifiedImageError:
        raise BadImage("cannot decode (not an image format PIL knows)") from None
    except Exception as e:
        raise BadImage(f"cannot decode ({e.__class__.__name__}: {e})") from None
    notes = []
    ext = PurePosixPath(name).suffix.lower()
    if ext in EXTS and ext not in _EXT_OF.get(fmt, ()):
        notes.append(f"{fmt} data in a {ext} file")
    if exif:
        orientation = im.getexif().get(ORIENTATION_TAG, 1)
        if orientation not in (1, None):
            im = ImageOps.exif_transpose(im)
            notes.append(f"EXIF orientation {orientation} applied")
    im = _to_rgb(im, notes)
    if im.width < 2 or im.height < 2:
        raise BadImage(f"image is {im.width}x{im.height}")
    return im, "; ".join(notes)


def decode_rgb(data: bytes, name: str = "", *, exif: bool = False) -> tuple[np.ndarray, str]:
    """uint8 RGB HxWx3 from encoded bytes, and a note (see :func:`decode_pil`)."""
    im, note = decode_pil(data, name, exif=exif)
    return np.ascontiguousarray(np.asarray(im)), note


def decode_bgr(data: bytes, name: str = "", *, exif: bool = False) -> tuple[np.ndarray, str]:
    """uint8 BGR HxWx3 (the channel order cv2.imread gives) from encoded bytes, and a note."""
    rgb, note = decode_rgb(data, name, exif=exif)
    return np.ascontiguousarray(rgb[:, :, ::-1]), note
