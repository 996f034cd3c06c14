"""Five- and nine-crops of an image, as Xmodal-Ctx / HAAV cut them (``CocoImageCrops``, ``ctx/dataset.py``).

- **five**: torchvision ``five_crop(image, (0.6*H, 0.6*W))`` with the size passed as *floats*. The
  corner boxes are ``(left, top, left + 0.6W, top + 0.6H)`` with ``left`` in ``{0, W - 0.6W}`` and
  ``top`` in ``{0, H - 0.6H}``; the centre box starts at ``int(round((H - 0.6H) / 2))`` /
  ``int(round((W - 0.6W) / 2))`` (torchvision ``center_crop``). PIL's ``Image.crop`` then rounds every
  float coordinate with Python ``round`` (half to even). Order: TL, TR, BL, BR, centre.
- **nine**: a 3x3 grid at ratio 0.4: row tops ``0, int(0.3H), int(0.6H)``, row bottoms
  ``int(0.4H), int(0.7H), H``; columns likewise with W. Row-major order (top row left to right first).

Boxes are ``(left, top, right, bottom)`` in pixels, exactly the integer box PIL cuts. The float
expressions are written as upstream writes them, so the rounding matches bit for bit.
"""

from __future__ import annotations

import itertools

from PIL import Image

Box = tuple[int, int, int, int]

FIVE_RATIO = 0.6
NINE_RATIO = 0.4


def _pil_box(top: float, left: float, height: float, width: float) -> Box:
    """The box torchvision's PIL ``crop(img, top, left, height, width)`` cuts: PIL rounds each coordinate."""
    return tuple(int(round(v)) for v in (left, top, left + width, top + height))  # type: ignore[return-value]


def five_crop_boxes(width: int, height: int, ratio: float = FIVE_RATIO) -> list[Box]:
    """TL, TR, BL, BR, centre boxes of torchvision ``five_crop`` with float size ``(ratio*H, ratio*W)``."""
    ch, cw = height * ratio, width * ratio
    center_top = int(round((height - ch) / 2.0))
    center_left = int(round((width - cw) / 2.0))
    return [
        _pil_box(0, 0, ch, cw),
        _pil_box(0, width - cw, ch, cw),
        _pil_box(height - ch, 0, ch, cw),
        _pil_box(height - ch, width - cw, ch, cw),
        _pil_box(center_top, center_left, ch, cw),
    ]


def nine_crop_boxes(width: int, height: int, ratio: float = NINE_RATIO) -> list[Box]:
    """The 3x3 grid boxes, row-major, with upstream's ``int()`` truncation."""
    h, w = height, width
    tops = (0, int((0.5 - ratio / 2) * h), int((1.0 - ratio) * h))
    bottoms = (int(ratio * h), int((0.5 + ratio / 2) * h), h)
    lefts = (0, int((0.5 - ratio / 2) * w), int((1.0 - ratio) * w))
    rights = (int(ratio * w), int((0.5 + ratio / 2) * w), w)
    rows, cols = list(zip(tops, bottoms, strict=True)), list(zip(lefts, rights, strict=True))
    return [(left, top, right, bottom) for (top, bottom), (left, right) in itertools.product(rows, cols)]


def crop(image: Image.Image, boxes: list[Box]) -> list[Image.Image]:
    """Cut each box out of ``image``."""
    return [image.crop(box) for box in boxes]


def five_crops(image: Image.Image, ratio: float = FIVE_RATIO) -> tuple[list[Box], list[Image.Image]]:
    """(boxes, crops) of the five-crop, TL, TR, BL, BR, centre."""
    boxes = five_crop_boxes(*image.size, ratio=ratio)
    return boxes, crop(image, boxes)


def nine_crops(image: Image.Image, ratio: float = NINE_RATIO) -> tuple[list[Box], list[Image.Image]]:
    """(boxes, crops) of the nine-crop, row-major."""
    boxes = nine_crop_boxes(*image.size, ratio=ratio)
    return boxes, crop(image, boxes)
