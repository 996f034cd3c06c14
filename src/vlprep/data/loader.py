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
    ``transform(bgr)`` (uint8 BGR HxWx3 when there is no transform)."""

    def __init__(self, uris: Sequence[str], transform: Callable | None = None):
        self.uris, self.transform = list(uris), transform

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int):
        uri = self.uris[i]
        try:
            bgr, note = imgs.decode_bgr(storage.read_bytes(uri), uri)
        except (imgs.BadImage, OSError) as e:  # FileNotFoundError included
            return i, None, "", None, str(e)
        size = (bgr.shape[1], bgr.shape[0])
        return i, (self.transform(bgr) if self.transform else bgr), note, size, None


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
                 num_workers: int = 0, transform: Callable | None = None, stack: bool = False,
                 pin_memory: bool = False):
    """A DataLoader yielding :class:`Batch` es in order: ``batch_size`` images each, or one per ``block``
    (lists of indices into ``uris``). Workers make their own gs:// client (``storage.reset_after_fork``)."""
    from torch.utils.data import DataLoader

    sampling = {"batch_sampler": [list(b) for b in blocks]} if blocks is not None else {
        "batch_size": max(1, int(batch_size)), "shuffle": False}
    workers = int(num_workers)
    return DataLoader(ImageDataset(uris, transform), **sampling, num_workers=workers, collate_fn=_Collate(stack),
                      pin_memory=pin_memory, worker_init_fn=storage.reset_after_fork if workers else None,
                      persistent_workers=False)
