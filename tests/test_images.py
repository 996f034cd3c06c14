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
    lst.write_text("b/2.jpg\na/1.png\n\ns3://bucket/x/3.jpg\ngs://bucket/4.jpg\n")  # URIs are kept as they are
    assert images.list_images(str(lst)) == sorted([str(tmp_path / "root" / "b/2.jpg"), str(tmp_path / "root/a/1.png"),
                                                   "s3://bucket/x/3.jpg", "gs://bucket/4.jpg"])
    karpathy = images.list_images(str(sample / "dataset_coco.json"), str(sample / "images"))
    assert len(karpathy) == 6 and all(p.endswith(".jpg") for p in karpathy)
    assert ids.split_of(karpathy[0]) == "train2014"
    with pytest.raises(VlprepError, match="no .jpg"):
        images.list_images(str(tmp_path / "root" / "a" / "nothing"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"split": "x"}]}))
    with pytest.raises(VlprepError, match="not a Karpathy split file"):
        images.list_images(str(bad))


def _exif_rotated_jpeg(orientation: int) -> bytes:
    """A 60x40 (w x h) JPEG whose EXIF says 'rotate on display' (6: 90 degrees clockwise)."""
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :10] = (255, 0, 0)  # a red band on the stored image's left edge
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = orientation
    return _encode(Image.fromarray(a), "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_orientation_policy_on_a_rotated_jpeg():
    data = _exif_rotated_jpeg(6)
    stored, note = images.decode_rgb(data, "r.jpg", exif=False)  # PIL.Image.open: X-LXMERT, Xmodal-Ctx, Maria
    assert stored.shape == (40, 60, 3) and note == ""
    assert stored[20, 2, 0] > 200 and stored[20, 57, 0] < 50  # red band still on the left
    shown, note = images.decode_rgb(data, "r.jpg", exif=True)  # cv2.imread >= 3.1: the BUTD recipes
    assert shown.shape == (60, 40, 3) and note == "EXIF orientation 6 applied"
    assert shown[2, 20, 0] > 200 and shown[57, 20, 0] < 50  # rotated clockwise: the band is on top
    bgr, _ = images.decode_bgr(data, "r.jpg", exif=True)
    np.testing.assert_array_equal(bgr, shown[:, :, ::-1])
    upright, note = images.decode_rgb(_exif_rotated_jpeg(1), "u.jpg", exif=True)
    assert upright.shape == (40, 60, 3) and note == ""


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_greys_are_scaled_not_clipped(mode):
    # "I" (32-bit) is how Pillow hands 16-bit greys over from TIFF and some PNG encoders
    grey = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    im = Image.fromarray(grey)  # a 16-bit grey PNG, as scanners and medical exports write them
    data = _encode(im, "PNG") if mode == "I;16" else _encode(im.convert("I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    rgb, note = images.decode_rgb(data, "g.png")
    assert note.endswith(f"converted from {mode}")
    expected = np.rint(grey / 257.0).astype(np.uint8)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert 120 < rgb.mean() < 135  # not turned white (Pillow's clamp gives ~255)
