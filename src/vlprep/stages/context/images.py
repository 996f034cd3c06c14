"""The image fan-out: plan blocks of images; per shard, cut each image into 15 CLIP views (whole, five
crops, nine crops) in DataLoader workers and encode them.

Views are resized and centre-cropped as the recipe says, as uint8 in the workers; the float
normalization runs once per block on the model's device (bit-identical to ``vlprep.models.clip.preprocess``).
Undecodable images (zero bytes, truncated, not an image) are skipped and listed in the done-marker.
"""

from __future__ import annotations

import logging

import numpy as np

from vlprep import stage
from vlprep.data import ids
from vlprep.data import images as imgs
from vlprep.data.loader import ImageDataset, image_loader
from vlprep.progress import Progress
from vlprep.stages.context.settings import IMAGE_FIELDS, N_VIEWS, STAGE, encoder_for

log = logging.getLogger(__name__)


def plan_images(out: str, *, num_shards: int = 1, split: str = "balanced") -> list[dict]:
    """After :func:`plan`: shards of blocks of ``image_batch`` sorted image URIs (item: ``[uri, ...]``)."""
    work = STAGE.open(out)
    settings = work.settings()
    uris = imgs.list_images(settings.images, settings.image_root)
    ids.refuse_shared_ids(uris, ids.context_key, "the context files are keyed by the number after the last '_' "
                          "of the file stem, else the stem; give e.g. one COCO split folder at a time")
    b = settings.image_batch
    items = [uris[i:i + b] for i in range(0, len(uris), b)]
    return work.plan(items, num_shards=num_shards, split=split, step="images",
                     fingerprint=settings.fingerprint(*IMAGE_FIELDS))


def cut_views(im, rule: str) -> np.ndarray:
    """The 15 views of a PIL RGB image (whole, five crops, nine crops), resized and centre-cropped as
    ``vlprep.models.clip.preprocess`` does, as uint8 (15, 224, 224, 3); :func:`normalize` finishes them."""
    from vlprep.models import clip, crops

    views = [im] + crops.five_crops(im)[1] + crops.nine_crops(im)[1]
    out = np.empty((N_VIEWS, clip.IMAGE_SIZE, clip.IMAGE_SIZE, 3), np.uint8)
    for j, v in enumerate(views):
        v = clip.resize_short_side(v)
        out[j] = np.asarray(v.crop(clip.center_crop_box(*v.size, clip.IMAGE_SIZE, rule)), dtype=np.uint8)
    return out


def normalize(views, device: str = "cpu"):
    """uint8 (..., 224, 224, 3) -> float32 (..., 3, 224, 224) with the CLIP mean/std, on ``device``.

    The same element-wise operations as ``clip.preprocess`` (``/255``, ``- mean``, ``/ std`` in float32), so
    the values are bit-identical; done once per block (on the GPU when there is one) instead of per view
    in the loader workers, which then send 4x fewer bytes.
    """
    import torch

    from vlprep.models import clip

    x = torch.as_tensor(views).to(device, non_blocking=True)
    x = x.movedim(-1, -3).to(torch.float32) / 255.0
    mean = torch.tensor(clip.CLIP_MEAN, dtype=torch.float32, device=x.device)[:, None, None]
    std = torch.tensor(clip.CLIP_STD, dtype=torch.float32, device=x.device)[:, None, None]
    return ((x - mean) / std).contiguous()


class Views:
    """Loader transform: RGB image -> uint8 (15, 224, 224, 3) views (a class: workers pickle it)."""

    def __init__(self, rule: str):
        self.rule = rule

    def __call__(self, rgb):
        import torch
        from PIL import Image

        return torch.from_numpy(cut_views(Image.fromarray(rgb), self.rule))


def encode_views(enc, views) -> dict[str, np.ndarray]:
    """uint8 (m, 15, 224, 224, 3) views -> the recipe's whole-image outputs and ``query`` (m, 15, d)."""
    pixels = normalize(views, enc.device)
    m = pixels.shape[0]
    whole = enc.encode_pixels(pixels[:, 0].contiguous())
    crops_q = enc.encode_pixels(pixels[:, 1:].reshape(m * (N_VIEWS - 1), *pixels.shape[2:]), ["query"])["query"]
    out = {k: v for k, v in whole.items() if k != "query"}
    out["query"] = np.concatenate([whole["query"][:, None], crops_q.reshape(m, N_VIEWS - 1, -1)], axis=1)
    return out


def encode_images(spec: dict, runtime: stage.Runtime | None = None) -> dict:
    """One image shard: visual context of each image and its 15 query vectors; bad images listed as failed.

    Parts: ``images.json`` (id, uri, block, size, note per encoded image), ``queries.npy`` (n, 15, d) and
    XC ``vis_ctx.npy`` (n, 768) or HV ``pooled.npy`` (n, 512) + ``grid.npy`` (n, 50, 768).
    """
    runtime = runtime or stage.Runtime()
    dev = runtime.resolved_device()

    def work(shard, work: stage.Work) -> dict:
        from vlprep.models.clip import get_recipe

        settings = work.settings()
        recipe = get_recipe(settings.recipe)
        names = ["vis_ctx"] if recipe.vis_ctx == "cls" else ["pooled", "grid"]
        enc = encoder_for(settings, dev)
        uris, blocks, block_of = [], [], []
        for b, block in enumerate(shard.items):
            blocks.append(list(range(len(uris), len(uris) + len(block))))
            uris += block
            block_of += [b] * len(block)
        arrays: dict[str, list] = {n: [] for n in names + ["query"]}
        meta, failed = [], []
        views = ImageDataset(uris, Views(recipe.preprocess), exif=False, rgb=True)  # upstream: PIL.Image.open
        with Progress(f"context images {shard.tag}", total=len(uris), unit="img") as bar:
            for batch in image_loader(uris, blocks=blocks, num_workers=runtime.num_workers, dataset=views, stack=True,
                                      pin_memory=dev.startswith("cuda")):
                failed += [{"item": uris[i], "error": err} for i, err in batch.failed]
                if batch.ok:
                    for name, arr in encode_views(enc, batch.values).items():
                        arrays[name].append(arr)
                meta += [{"key": ids.context_key(uris[i]), "uri": uris[i], "block": block_of[i], "width": w,
                          "height": h, **({"note": note} if note else {})} for i, note, (w, h) in batch.ok]
                bar.advance(len(batch.ok) + len(batch.failed), failed=len(batch.failed))
        parts = _write_parts(shard, meta, arrays, enc.dims)
        for f in failed:
            log.warning("context: skipped %s (%s)", f["item"], f["error"])
        return {"parts": parts, "failed": failed, "images": len(meta), "device": dev,
                "random_weights": enc.is_random, "weights": {r: i.description for r, i in enc.loaded.items()}}

    return STAGE.run_shard(spec, work, step="images", params={"device": dev, "num_workers": runtime.num_workers})


def _write_parts(shard, meta: list[dict], arrays: dict[str, list], dims: dict) -> list[str]:
    import json

    shard.write_part("images.json", json.dumps(meta, indent=0, ensure_ascii=False).encode("utf-8"))
    names = ["images.json"]
    for name, chunks in arrays.items():
        arr = np.concatenate(chunks) if chunks else np.zeros(
            (0,) + ((N_VIEWS,) if name == "query" else ()) + tuple(dims[name]), np.float32)
        part = "queries.npy" if name == "query" else f"{name}.npy"
        shard.save_array(part, arr.astype(np.float32, copy=False))
        names.append(part)
    return names
