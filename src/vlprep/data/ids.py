"""Every image-id rule in one place: what an image is called in each output, and in which order.

| rule | example | used by |
| --- | --- | --- |
| :func:`volta_id` COCO: the file stem | ``COCO_val2014_000000531912`` | region TSV / H5 ``img_id`` |
| :func:`volta_id` Flickr30k: int(stem) | ``1000092795`` | region TSV / H5 ``img_id`` |
| :func:`lmdb_key` COCO: str(int(after the last ``_``)) | ``b"531912"`` | VOLTA LMDB keys |
| :func:`lmdb_key` Flickr30k: the id as it is | ``b"1000092795"`` | VOLTA LMDB keys |
| :func:`caption_id` | ``531912`` | ``*_ann.jsonl`` rows -> hard negatives |
| :func:`context_key`: int after the last ``_`` of the stem, else the stem | ``531912``, ``"cat"`` | context HDF5 |
| :func:`entry_name`: decimal id unpadded, other names as they are | ``"531912"`` | context HDF5 names |
| :func:`key_order`: ints by value, then names by code point | | context merge order |
| :func:`split_of`: the folder an image is in | ``val2014`` | region TSV per split, LMDB groups |

:func:`refuse_shared_ids` stops a plan when two images would get one id in an output (``X.jpg`` and
``X.png``): one would silently replace the other.

Upstream's Maria ("{set}/{id}") and X-LXMERT (file stems) rules belong here too.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from pathlib import PurePosixPath

from vlprep import VlprepError
from vlprep.data.image_paths import few

DATASETS = ("coco", "flickr30k")


def split_of(uri: str) -> str:
    """The folder an image is in (COCO: train2014 / val2014 / test2015)."""
    return PurePosixPath(uri).parent.name


def volta_id(uri: str, dataset: str) -> str | int:
    """VOLTA's img_id: COCO the file stem (``COCO_train2014_000000000009``), Flickr30k int(stem)."""
    stem = PurePosixPath(uri).stem
    if dataset == "flickr30k":
        try:
            return int(stem)
        except ValueError:
            raise VlprepError(f"{uri}: Flickr30k image names are numeric (e.g. 1000092795.jpg)") from None
    if dataset != "coco":
        raise VlprepError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    return stem


def lmdb_key(img_id, dataset: str) -> bytes:
    """VOLTA's LMDB key: COCO ``str(int(img_id.split("_")[-1]))``, Flickr ``str(img_id)``."""
    if dataset == "coco":
        try:
            return str(int(str(img_id).split("_")[-1])).encode()
        except ValueError:
            raise VlprepError(f"COCO image id {img_id!r} does not end in _<number>; is this a COCO TSV?") from None
    if dataset == "flickr30k":
        return str(img_id).encode()
    raise VlprepError(f"unknown dataset {dataset!r} for the LMDB key rule; use one of {', '.join(DATASETS)}")


def caption_id(row: dict, dataset: str) -> int:
    """The int image id of a caption annotation row (COCO ``id``; Flickr30k the stem of ``img_path``)."""
    return int(PurePosixPath(row["img_path"]).stem) if dataset == "flickr30k" else int(row["id"])


def context_key(uri: str) -> int | str:
    """The context stage's image id: the int after the last ``_`` of the stem (COCO, and a numeric
    stem such as Flickr30k's is its own id), else the stem (``cat.jpg`` -> ``"cat"``)."""
    stem = PurePosixPath(str(uri)).stem
    tail = stem.rsplit("_", 1)[-1]
    if tail.isascii() and tail.isdigit():
        return int(tail)
    return stem


def key_order(key: int | str) -> tuple:
    """Sort order of ids: integers by value, then names by code point."""
    return (0, key, "") if isinstance(key, int) else (1, 0, key)


def entry_name(image_id: int | str) -> str:
    """The HDF5 name of an image: the decimal id, no padding, for an int or a string of ASCII digits
    (``"000042"`` -> ``"42"``); any other string is used as it is."""
    if isinstance(image_id, str) and not (image_id.isascii() and image_id.isdigit()):
        if not image_id or "/" in image_id or image_id in (".", ".."):
            raise VlprepError(f"{image_id!r} cannot name an HDF5 entry")
        return image_id
    return str(int(image_id))


def refuse_shared_ids(uris: Sequence[str], id_of: Callable[[str], Hashable], keyed: str) -> None:
    """One error listing every image whose id (``id_of``) an earlier image already has, with both files.

    ``keyed`` says which output is keyed that way (e.g. "the region TSVs are keyed by split and file stem")."""
    first: dict = {}
    clashes = []
    for uri in uris:
        key = id_of(uri)
        if key in first:
            clashes.append(f"{first[key]} and {uri} (image id {key!r})")
        else:
            first[key] = uri
    if clashes:
        raise VlprepError(
            f"{len(clashes)} image(s) have the same image id as another ({keyed}): {few(clashes)}; one would replace the "
            "other in the outputs. Remove one of each pair, or pass a list file (.txt) naming the images to use")
