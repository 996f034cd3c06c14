"""Image sources and decoding that never crashes a shard."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlprep import VlprepError
from vlprep.data import ids, images


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rgb() -> Image.Image:
    a = np.zeros((40, 60, 3), np.uint8)
    a[..., 0] = 200  # red
    a[10:20, :, 2] = 255
    return Image.fromarray(a)


def test_decode_gives_bgr_like_cv2(rgb):
    bgr, note = images.decode_bgr(_encode(rgb, "PNG"), "x.png")
    assert bgr.shape == (40, 60, 3) and note == ""
    assert bgr[0, 0].tolist() == [0, 0, 200] and bgr[15, 0].tolist() == [255, 0, 200]


@pytest.mark.parametrize("mode,note", [("L", "converted from L"), ("CMYK", "converted from CMYK"),
                                       ("P", "converted from P")])
def test_other_modes_are_converted(rgb, mode, note):
    im = rgb.convert(mode)
    bgr, got = images.decode_bgr(_encode(im, "JPEG" if mode != "P" else "PNG"), "x.jpg" if mode != "P" else "x.png")
    assert bgr.shape == (40, 60, 3) and bgr.dtype == np.uint8
    assert note in got


def test_mislabelled_is_decoded_by_content(rgb):
    bgr, note = images.decode_bgr(_encode(rgb, "PNG"), "photo.jpg")
    assert bgr.shape == (40, 60, 3) and note == "PNG data in a .jpg file"


@pytest.mark.parametrize("data,why", [(b"", "zero-byte"), (b"not an image at all", "cannot decode"),
                                      (None, "cannot decode")])
def test_bad_images_raise_badimage(rgb, data, why):
    if data is None:  # truncated JPEG
        data = _encode(rgb, "JPEG")[:300]
    with pytest.raises(images.BadImage, match=why):
        images.decode_bgr(data, "x.jpg")


def test_sources(tmp_path, rgb, sample):
    for name in ["b/2.jpg", "a/1.png", "a/notes.txt", "c.JPG"]:
        p = tmp_path / "root" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_encode(rgb, "PNG"))
    found = images.list_images(str(tmp_path / "root"))
    assert [str(Path(p).relative_to(tmp_path / "root")) for p in found] == ["a/1.png", "b/2.jpg", "c.JPG"]
    lst = tmp_path / "root" / "list.txt"
    lst.write_text("b/2.jpg\na/1.png\n\n")
    assert images.list_images(str(lst)) == sorted([str(tmp_path / "root" / "b/2.jpg"), str(tmp_path / "root/a/1.png")])
    karpathy = images.list_images(str(sample / "dataset_coco.json"), str(sample / "images"))
    assert len(karpathy) == 6 and all(p.endswith(".jpg") for p in karpathy)
    assert ids.split_of(karpathy[0]) == "train2014"
    with pytest.raises(VlprepError, match="no .jpg"):
        images.list_images(str(tmp_path / "root" / "a" / "nothing"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"split": "x"}]}))
    with pytest.raises(VlprepError, match="not a Karpathy split file"):
        images.list_images(str(bad))
