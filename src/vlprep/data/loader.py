"""One torch Dataset / DataLoader over image URIs: read from the store and decoded in worker processes.

A bad file never stops a shard: its item comes back as failed with the reason. ``transform`` turns the
decoded image into what the model step needs (in the worker), e.g. the context stage's 15 CLIP views.

    for batch in image_loader(uris, batch_size=32, num_workers=4):
        batch.ok      # [(index into uris, note, (width, height)), ...]  note: '' or e.g. "converted from CMYK"
        batch.failed  # [(index into uris, error), ...]
        batch.values  # the ok images' values, in order: a list, or with stack=True one torch.stack (None if none)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from vlprep import storage
from vlprep.data import images as imgs


class Batch(NamedTuple):  # a NamedTuple, so that DataLoader(pin_memory=True) pins ``values``
    ok: list
    failed: list
    values: Any


class ImageDataset:
    """Item i: ``(i, value, note, (w, h), None)`` or ``(i, None, "", None, error)``. ``value`` is
    ``transform(image)`` (the uint8 HxWx3 image itself when there is no transform): BGR, as cv2.imread
    gives, or RGB with ``rgb``; ``exif``: apply the EXIF orientation (the recipe's policy, see
    ``vlprep.data.images``)."""

    def __init__(self, uris: Sequence[str], transform: Callable | None = None, *, exif: bool = False,
                 rgb: bool = False):
        self.uris, self.transform, self.exif, self.rgb = list(uris), transform, exif, rgb

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int):
        uri = self.uris[i]
        try:
            decode = imgs.decode_rgb if self.rgb else imgs.decode_bgr
            image, note = decode(imgs.read_image(uri), uri, exif=self.exif)
        except imgs.BadImage as e:  # unreadable (missing, a dangling link, ...) or undecodable
            return i, None, "", None, str(e)
        size = (image.shape[1], image.shape[0])
        return i, (self.transform(image) if self.transform else image), note, size, None


def _collate(items: list, stack: bool) -> Batch:
    good = [it for it in items if it[4] is None]
    ok = [(i, note, size) for i, _, note, size, _ in good]
    failed = [(i, err) for i, _, _, _, err in items if err is not None]
    values = [value for _, value, _, _, _ in good]
    if stack:
        import torch

        values = torch.stack([torch.as_tensor(v) for v in values]) if values else None
    return Batch(ok, failed, values)


class _Collate:  # a class, not a closure: worker processes started by spawn must pickle it
    def __init__(self, stack: bool):
        self.stack = stack

    def __call__(self, items: list) -> Batch:
        return _collate(items, self.stack)


def image_loader(uris: Sequence[str], *, batch_size: int = 1, blocks: Sequence[Sequence[int]] | None = None,
                 num_workers: int = 0, dataset: ImageDataset | None = None, stack: bool = False,
                 pin_memory: bool = False):
    """A DataLoader yielding :class:`Batch` es in order: ``batch_size`` images each, or one per ``block``
    (lists of indices into ``uris``), decoded by ``dataset`` (default: BGR, no EXIF rotation, no transform).
    Workers make their own gs:// client (``storage.reset_after_fork``)."""
    from torch.utils.data import DataLoader

    sampling = {"batch_sampler": [list(b) for b in blocks]} if blocks is not None else {
        "batch_size": max(1, int(batch_size)), "shuffle": False}
    workers = int(num_workers)
    return DataLoader(dataset or ImageDataset(uris), **sampling, num_workers=workers, collate_fn=_Collate(stack),
                      pin_memory=pin_memory, worker_init_fn=storage.reset_after_fork if workers else None,
                      persistent_workers=False)
