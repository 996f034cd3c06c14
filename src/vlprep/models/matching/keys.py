"""Image sets and their keys (Maria's ``create_image_ids.py`` / ``extract_vision_keys.py``), per shard.

**Image sets and their order.** An image set is a name, ids and image URIs, row-aligned:
- from an ids file (``{set}.ids``, one id per line): file order, as upstream reads it; the image of id
  ``x`` is ``{image_root}/{x}.jpg`` (Open Images: upstream's ``{OI_ROOT}/images/{id}.jpg``);
- from an image folder: ids are the file stems **sorted** (upstream walked the folder in ``os.walk``
  order, which no two machines share; its ``open_images.ids`` was written from that walk);
- from an LXMERT JSON (``coco_train`` = ``mscoco_train.json`` ...): JSON order, COCO split folders.

**Path root rule.** ``{set}.path`` holds each kept image's URI exactly as read:
``storage.join(image_root, id + ".jpg")``. Upstream wrote ``{OI_ROOT}/images/{id}.jpg`` (for Maria's
fixture ``data/open_images/images/{id}.jpg``), so with ``image_root`` set to that same string the file
is upstream's byte for byte; with another root only the prefix before the basename differs.
Vokenization uses only basenames, so the root never reaches its output.

**Keys per shard.** ``extract_keys`` runs the image tower over a contiguous slice of the set and writes
one part (npz: ``keys`` (n, d) float32, ``ids``, ``paths``); images that cannot be read are skipped and
returned as failures (upstream printed and skipped them). ``merge_keys`` concatenates parts in order
into ``{set}.hdf5`` / ``.path`` / ``.ids``; the same parts give the same bytes, so a rerun is idempotent.
Batches are cut at multiples of ``batch_size`` in the whole set (failed images leave a batch short,
where upstream refilled it), so shards whose bounds are multiples of the batch size give exactly the
keys of one run; other bounds change only float rounding.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import torch

from vlprep import VlprepError, storage
from vlprep.formats import vokens as fmt
from vlprep.models.matching.images import pixel_batches
from vlprep.progress import Progress

UPSTREAM_KEY_BATCH = 512  # extract_vision_keys.py --batch-size default


@dataclass(frozen=True)
class ImageSet:
    name: str
    ids: list[str]
    uris: list[str]

    def __post_init__(self):
        if len(self.ids) != len(self.uris):
            raise VlprepError(f"image set {self.name}: {len(self.ids)} ids for {len(self.uris)} images")
        if len(set(self.ids)) != len(self.ids):
            raise VlprepError(f"image set {self.name}: ids repeat; each image must appear once")


def image_set_from_ids(name: str, ids_uri: str, image_root: str, suffix: str = ".jpg") -> ImageSet:
    """Ids from a file (one per line, file order); images ``{image_root}/{id}{suffix}``."""
    try:
        ids = [line.strip() for line in storage.read_text(ids_uri).splitlines() if line.strip()]
    except FileNotFoundError:
        raise VlprepError(f"{ids_uri}: no such ids file") from None
    return ImageSet(name, ids, [storage.join(image_root, i + suffix) for i in ids])


def image_set_from_folder(name: str, image_root: str, suffix: str = ".jpg") -> ImageSet:
    """Every ``*{suffix}`` file directly in ``image_root``, ids = stems, sorted."""
    root = str(image_root).rstrip("/")
    uris = [u for u in storage.list_prefix(root) if u.endswith(suffix) and storage.parent(u) == root]
    ids = sorted(PurePosixPath(u).name[: -len(suffix)] for u in uris)
    if not ids:
        raise VlprepError(f"{image_root}: no *{suffix} files; pass the folder holding the images")
    return ImageSet(name, ids, [storage.join(root, i + suffix) for i in ids])


def image_set_from_lxmert(name: str, json_uri: str, image_root: str) -> ImageSet:
    """COCO images of an LXMERT caption JSON, in its order; ``image_root`` holds ``train2014/`` and ``val2014/``."""
    from vlprep.data.lxmert_json import coco_image_uri, lxmert_image_ids

    ids = lxmert_image_ids(json_uri)
    return ImageSet(name, ids, [coco_image_uri(image_root, i) for i in ids])


def write_ids(image_set: ImageSet, uri: str) -> None:
    """``{set}.ids`` as upstream's ``create_image_ids.py`` writes it."""
    storage.write_text(uri, "".join(f"{i}\n" for i in image_set.ids))


def extract_keys(visn_model: torch.nn.Module, image_set: ImageSet, start: int, stop: int, part_uri: str, *,
                 transform, batch_size: int = UPSTREAM_KEY_BATCH, num_workers: int = 0) -> dict:
    """Keys of images ``[start, stop)`` of the set into one part; returns ``{"count", "failed": [...]}``.

    ``visn_model``: the matcher's image tower (``Matcher.visn_model``) in eval mode, on its device;
    ``transform``: ``images.eval_transform(config)``.
    """
    device = next(visn_model.parameters()).device
    uris, ids = image_set.uris[start:stop], image_set.ids[start:stop]
    kept: list[int] = []
    keys: list[np.ndarray] = []
    failed = []
    with Progress(f"vokens keys {image_set.name} [{start}, {stop})", total=len(uris), unit="img") as bar:
        for batch in pixel_batches(uris, transform, batch_size=batch_size, offset=start, num_workers=num_workers,
                                   pin_memory=device.type == "cuda"):
            failed += [{"item": ids[i], "uri": uris[i], "error": why} for i, why in batch.failed]
            if batch.pixels is not None:
                with torch.inference_mode():
                    keys.append(visn_model(batch.pixels.to(device, non_blocking=True)).float().cpu().numpy())
                kept += batch.indices
            bar.advance(len(batch.indices) + len(batch.failed), failed=len(batch.failed))
    dim = visn_model.mlp.linears[-1].out_features
    buf = io.BytesIO()
    np.savez(buf, keys=np.concatenate(keys) if keys else np.zeros((0, dim), np.float32),
             ids=np.array([ids[i] for i in kept], dtype=str), paths=np.array([uris[i] for i in kept], dtype=str))
    storage.write_bytes(part_uri, buf.getvalue())
    return {"count": len(kept), "failed": failed}


def read_key_part(part_uri: str) -> tuple[np.ndarray, list[str], list[str]]:
    with np.load(io.BytesIO(storage.read_bytes(part_uri)), allow_pickle=False) as z:
        return z["keys"], z["ids"].tolist(), z["paths"].tolist()


def merge_keys(part_uris: Sequence[str], keys_dir: str, set_name: str) -> dict:
    """Concatenate key parts in order into ``{keys_dir}/{set}.hdf5``, ``.path`` and ``.ids``."""
    parts = [read_key_part(u) for u in part_uris]
    dims = {k.shape[1] for k, _, _ in parts}
    if len(dims) != 1:
        raise VlprepError(f"{set_name}: key parts have dimensions {sorted(dims)} (no parts, or parts of different "
                          "matchers); redo the shards with one matcher")
    keys = np.concatenate([k for k, _, _ in parts])
    ids = [i for _, part_ids, _ in parts for i in part_ids]
    paths = [p for _, _, part_paths in parts for p in part_paths]
    fmt.write_keys(keys_dir, set_name, keys, paths, ids)
    return {"images": len(ids), "dim": int(keys.shape[1])}
