"""The one image loader: failed items instead of crashes, order, blocks, stacking, EXIF policy, workers."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vlprep.data import images
from vlprep.data.loader import ImageDataset, image_loader


def _jpeg(w: int, h: int, orientation: int = 1) -> bytes:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 4] = (255, 0, 0)
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = orientation
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def _files(tmp_path) -> list[str]:
    (tmp_path / "a.jpg").write_bytes(_jpeg(60, 40))
    (tmp_path / "b.jpg").write_bytes(b"")
    (tmp_path / "d.jpg").write_bytes(_jpeg(60, 40, orientation=6))  # shown rotated: 40 wide, 60 high
    return [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg")]  # c.jpg does not exist


def test_bad_files_come_back_failed_in_order(tmp_path):
    uris = _files(tmp_path)
    batches = list(image_loader(uris, batch_size=3))
    assert [len(b.ok) + len(b.failed) for b in batches] == [3, 1]
    ok = [i for b in batches for i, _, _ in b.ok]
    failed = {i: err for b in batches for i, err in b.failed}
    assert ok == [0, 3] and sorted(failed) == [1, 2]
    assert "zero-byte" in failed[1] and "no such file" in failed[2]
    first = batches[0]
    bgr, _ = images.decode_bgr((tmp_path / "a.jpg").read_bytes(), uris[0])
    np.testing.assert_array_equal(first.values[0], bgr)
    assert first.ok[0] == (0, "", (60, 40))


def test_exif_policy_rgb_transform_blocks_and_workers(tmp_path):
    uris = _files(tmp_path)
    stored = list(image_loader(uris, blocks=[[3], [0, 1]], dataset=ImageDataset(uris, exif=False)))
    shown = list(image_loader(uris, blocks=[[3], [0, 1]], dataset=ImageDataset(uris, exif=True)))
    assert stored[0].ok[0][2] == (60, 40) and shown[0].ok[0] == (3, "EXIF orientation 6 applied", (40, 60))
    assert [i for i, _, _ in stored[1].ok] == [0] and stored[1].failed[0][0] == 1
    rgb = ImageDataset(uris, lambda im: im[:2, :2].copy(), rgb=True)
    for workers in (0, 2):
        got = list(image_loader(uris, batch_size=4, num_workers=workers, dataset=rgb, stack=True))
        assert len(got) == 1 and tuple(got[0].values.shape) == (2, 2, 2, 3)
        assert int(got[0].values[0, 0, 0, 0]) > 200  # red first: RGB
