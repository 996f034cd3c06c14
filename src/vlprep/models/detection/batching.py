"""Batching that never changes an image's result, plus the run options every detector shares.

Images are bucketed by the size their tensor has at the backbone (resized, or padded for the
size-divisible variant), so a batch is a plain stack: no padding an image would not get alone ever
reaches the network. Transfers go through pinned memory on CUDA; autocast and channels_last are
CUDA-only options.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprep import VlprepError
from vlprep.models import weights as wts

_AUTOCAST_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": None,
    "float32": None,
    "none": None,
}


@dataclass(frozen=True)
class Item:
    """One image of a call: its position in the caller's list, original size, input size."""

    index: int
    image_hw: tuple[int, int]
    input_hw: tuple[int, int]  # resized, before any padding


def buckets(
    items: Sequence[Item], batch_size: int, key: Callable[[Item], Hashable] = lambda it: it.input_hw
) -> list[list[Item]]:
    """Items grouped by ``key`` (default: the input size), in first-seen order, cut into batches."""
    by_key: dict[Hashable, list[Item]] = {}
    for it in items:
        by_key.setdefault(key(it), []).append(it)
    return [group[s : s + batch_size] for group in by_key.values() for s in range(0, len(group), batch_size)]


def padded_hw(hw: tuple[int, int], divisor: int) -> tuple[int, int]:
    """``hw`` rounded up to multiples of ``divisor``."""
    return tuple(-(-s // divisor) * divisor for s in hw)  # type: ignore[return-value]


def stack_padded(tensors: Sequence[Tensor], divisor: int) -> Tensor:
    """[C,H,W] tensors zero-padded bottom/right to a multiple of ``divisor`` and stacked (callers batch
    only tensors with the same padded size, so each gets exactly the padding it would get alone)."""
    out = []
    for t in tensors:
        ph, pw = padded_hw(tuple(t.shape[-2:]), divisor)
        out.append(F.pad(t, (0, pw - t.shape[-1], 0, ph - t.shape[-2])))
    return torch.stack(out)


class Detector(nn.Module):
    """Run options and weights provenance shared by the detectors (set with :meth:`configure`):
    ``device``; ``autocast_dtype`` (torch.bfloat16 or torch.float16, CUDA only); ``channels_last``
    (CUDA only); ``roi_chunk`` (max RoIs per RoI-head call, where the head chunks)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: wts.Resolved | None = None  # where the weights came from (is_random for random:<seed>)
        self.autocast_dtype: torch.dtype | None = None
        self.channels_last = False
        self.roi_chunk: int | None = None

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def is_random(self) -> bool:
        return bool(self.weights and self.weights.is_random)

    def configure(
        self,
        device: str | torch.device | None = None,
        autocast_dtype: torch.dtype | str | None = None,
        channels_last: bool = False,
        roi_chunk: int | None = None,
    ) -> Detector:
        """Set run options (see the class docstring); returns self."""
        if device is not None:
            self.to(device)
        if isinstance(autocast_dtype, str):
            if autocast_dtype.lower() not in _AUTOCAST_NAMES:
                raise VlprepError(f"autocast dtype {autocast_dtype!r}: use bf16, fp16 or fp32")
            autocast_dtype = _AUTOCAST_NAMES[autocast_dtype.lower()]
        if (autocast_dtype is not None or channels_last) and self.device.type != "cuda":
            raise VlprepError(
                "autocast and channels_last are CUDA-only options; use device='cuda' or drop them"
            )
        if autocast_dtype not in (None, torch.float16, torch.bfloat16):
            raise VlprepError(f"autocast dtype {autocast_dtype}: use torch.bfloat16 or torch.float16")
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.roi_chunk = roi_chunk
        return self

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    def to_input(self, x: Tensor) -> Tensor:
        """A CPU batch on the model's device (page-locked first on CUDA, so the copy overlaps work
        already queued), channels_last when configured."""
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
