"""Images to network inputs, as each upstream prepares them.

- BUTD (detectron2 port): uint8 BGR, detectron2 ``ResizeShortestEdge`` sizes, Pillow bilinear resize of
  the uint8 image, then minus the pixel mean (done by the detector).
- X-LXMERT (``coco_extract_{grid,bbox}_feature.py``): float32 BGR minus the pixel mean FIRST, then
  ``cv2.resize(INTER_LINEAR)`` of the float image. OpenCV is not a dependency:
  :func:`resize_linear_cv2` recomputes its separable linear taps (the same float/double arithmetic
  for source positions and weights, edge pixels copied) in torch.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vlprep import VlprepError

PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)  # Detectron's; both upstreams use it, std 1


def check_bgr(img: np.ndarray, i: int) -> np.ndarray:
    """``img`` if it is a non-empty uint8 HxWx3 array, else a VlprepError naming image ``i``."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise VlprepError(
            f"image {i}: expected a uint8 HxWx3 BGR array (vlprep.data.images.decode_bgr), got {desc}"
        )
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise VlprepError(f"image {i}: empty image {img.shape}")
    return img


# ---------------------------------------------------------------- BUTD (detectron2 port)


def resized_hw(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge``: short side to ``min_size``, long side capped at ``max_size``."""
    scale = min_size * 1.0 / min(h, w)
    if h < w:
        newh, neww = min_size, scale * w
    else:
        newh, neww = scale * h, min_size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def resize_bgr(bgr: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """Pillow bilinear resize of a uint8 HxWx3 image (as the detectron2 port does)."""
    h, w = bgr.shape[:2]
    nh, nw = resized_hw(h, w, min_size, max_size)
    if (nh, nw) == (h, w):
        return bgr
    return np.asarray(Image.fromarray(bgr).resize((nw, nh), Image.BILINEAR))


# ---------------------------------------------------------------- X-LXMERT (vqa-maskrcnn-benchmark)


def xlxmert_scale(h: int, w: int, min_size: int = 800, max_size: int = 1333) -> float:
    """``min_size / short side``, or ``max_size / long side`` when ``round(scale * long) > max_size``
    (upstream's test, with its constants 800 and 1333)."""
    scale = min_size / min(h, w)
    if np.round(scale * max(h, w)) > max_size:
        scale = max_size / max(h, w)
    return float(scale)


def grid_input_hw(
    h: int, w: int, imsize: int | None = None, min_size: int = 800, max_size: int = 1333
) -> tuple[int, int]:
    """grid8's input size: ``imsize`` square, else ``int(scale * side)`` floored to a multiple of 32 each."""
    if imsize:
        return imsize, imsize
    scale = xlxmert_scale(h, w, min_size, max_size)
    nh, nw = int(scale * h), int(scale * w)
    return nh - nh % 32, nw - nw % 32


def boxes_input_hw(h: int, w: int, min_size: int = 800, max_size: int = 1333) -> tuple[int, int]:
    """boxes36's input size: ``cv2.resize(fx=fy=scale)`` rounds ``side * scale`` to nearest (half to even)."""
    scale = xlxmert_scale(h, w, min_size, max_size)
    return int(np.rint(h * scale)), int(np.rint(w * scale))


def minus_mean(bgr: np.ndarray) -> Tensor:
    """float32 [3,H,W] of ``float32(bgr) - mean``, subtracted in float64 as upstream's numpy
    ``im -= np.array(mean)`` does (a float64 operand), then stored as float32."""
    out = bgr.astype(np.float64) - np.array(PIXEL_MEAN_BGR)
    return torch.from_numpy(np.ascontiguousarray(out.astype(np.float32).transpose(2, 0, 1)))


def _taps(n_in: int, n_out: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """cv2's linear taps along one axis: source indices ``i0``, ``i1`` and the weight of ``i1`` (a float32
    value, as float64). Source position ``(d + 0.5) * scale - 0.5`` in double; floor; positions before
    the first pixel or at/after the last one take that pixel alone."""
    f = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(f)
    frac = f - i0
    i0 = i0.astype(np.int64)
    low, high = i0 < 0, i0 >= n_in - 1
    frac[low | high] = 0
    i0[low] = 0
    i0[high] = n_in - 1
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = frac.astype(np.float32).astype(np.float64)
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(frac)


def _lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """float32 ``a + (b - a) * t`` with the multiply-add fused (one rounding), as OpenCV's IPP path
    computes it: the float32 product is exact in float64, so the float64 sum rounds as a fused one."""
    return (a.double() + (b - a).double() * t).float()


def resize_linear_cv2(x: Tensor, out_hw: tuple[int, int], scale: float | None = None) -> Tensor:
    """``cv2.resize(INTER_LINEAR)`` of a float32 [C,H,W] tensor: along x, then along y.

    ``scale`` given (``fx = fy = scale``): source step ``1 / scale``; otherwise ``1 / (out / in)``, both
    in double as OpenCV computes them. Bit-identical to opencv-python-headless 5.0 on the fixture
    images (its IPP path: ``a + (b - a) * t``, fused).
    """
    c, h, w = x.shape
    oh, ow = out_hw
    if (oh, ow) == (h, w) and scale in (None, 1.0):
        return x
    i0, i1, tx = _taps(w, ow, 1.0 / (scale if scale else ow / w))
    rows = _lerp(x[:, :, i0], x[:, :, i1], tx)
    j0, j1, ty = _taps(h, oh, 1.0 / (scale if scale else oh / h))
    return _lerp(rows[:, j0, :], rows[:, j1, :], ty[:, None])
