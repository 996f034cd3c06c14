"""Images for the matcher: decoding, Maria's transforms, and a batch loader over image URIs.

Decoding is torchvision's ``default_loader`` as Maria uses it: PIL, ``convert("RGB")``, no EXIF
orientation (CMYK, L, RGBA and PNG bytes named ``.jpg`` all load as RGB), straight to a PIL image
through ``vlprep.data.images.decode_pil``, the decoder every stage uses. A
file that is missing, truncated or not an image is a failure reported with a stable reason, never a
crash (upstream printed it and skipped the image). Unlike upstream (``Image.MAX_IMAGE_PIXELS = None``),
images over PIL's decompression-bomb error limit (~179 Mpx) are failures too.

Transforms (``xmatching/main.py``, ``vokenization/extract_vision_keys.py``), with ImageNet mean/std:
- eval (keys, validation): Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize;
- train: RandomResizedCrop(224) -> RandomHorizontalFlip -> ToTensor -> Normalize.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from vlprep import storage
from vlprep.data import images as imgs
from vlprep.models.matching.config import MatcherConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(config: MatcherConfig) -> Callable[[Image.Image], torch.Tensor]:
    from torchvision import transforms as T

    return T.Compose([T.Resize(config.resize), T.CenterCrop(config.crop), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(config: MatcherConfig) -> Callable[[Image.Image], torch.Tensor]:
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(config.crop), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def read_rgb(uri: str) -> Image.Image:
    """The image at ``uri`` as PIL RGB (``vlprep.data.images.decode_pil``, no EXIF orientation, as PIL's
    default loader); raises ``BadImage`` (with the reason) when it cannot be read."""
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise imgs.BadImage(f"cannot read ({type(e).__name__})") from None
    return imgs.decode_pil(data, uri, exif=False)[0]


class _Pixels:
    """torch Dataset: i -> (i, transformed tensor, "") or (i, None, reason)."""

    def __init__(self, uris: Sequence[str], transform: Callable[[Image.Image], torch.Tensor]):
        self.uris, self.transform = list(uris), transform

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(read_rgb(self.uris[i])), ""
        except imgs.BadImage as e:
            return i, None, str(e)


@dataclass
class PixelBatch:
    indices: list[int]  # positions (in the input list) of the images in ``pixels``
    pixels: torch.Tensor | None  # (n, 3, crop, crop), None when every image of the batch failed
    failed: list[tuple[int, str]]  # (position, reason)


def _collate(items) -> PixelBatch:
    ok = [(i, px) for i, px, _ in items if px is not None]
    failed = [(i, why) for i, px, why in items if px is None]
    pixels = torch.stack([px for _, px in ok]) if ok else None
    return PixelBatch([i for i, _ in ok], pixels, failed)


def aligned_blocks(count: int, batch_size: int, offset: int = 0) -> list[list[int]]:
    """Positions ``0..count-1`` cut where ``offset + position`` is a multiple of ``batch_size``.

    A shard starting at item ``offset`` of a larger list then forms exactly the batches one run over the
    whole list forms (when its bounds are multiples of ``batch_size``), so its outputs are bit-identical.
    """
    cuts = [0] + [p for p in range(1, count) if (offset + p) % batch_size == 0] + [count]
    return [list(range(a, b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def pixel_batches(uris: Sequence[str], transform: Callable[[Image.Image], torch.Tensor], *, batch_size: int,
                  offset: int = 0, num_workers: int = 0, pin_memory: bool = False) -> Iterator[PixelBatch]:
    """Batches of consecutive inputs aligned as :func:`aligned_blocks` (fewer pixels where images failed)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_Pixels(uris, transform), batch_sampler=aligned_blocks(len(uris), batch_size, offset),
                        num_workers=num_workers, collate_fn=_collate, pin_memory=pin_memory,
                        worker_init_fn=storage.reset_after_fork if num_workers else None)
    yield from loader
