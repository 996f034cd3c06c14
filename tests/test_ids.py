"""Every image-id rule (vlprep.data.ids), and that the format modules' own copies agree with it."""

from __future__ import annotations

import pytest

from vlprep import VlprepError
from vlprep.data import ids
from vlprep.formats import ctx_h5, volta_lmdb


def test_volta_ids():
    assert ids.volta_id("gs://b/train2014/COCO_train2014_000000000009.jpg", "coco") == "COCO_train2014_000000000009"
    assert ids.volta_id("/x/1000092795.jpg", "flickr30k") == 1000092795
    with pytest.raises(VlprepError, match="numeric"):
        ids.volta_id("/x/abc.jpg", "flickr30k")
    with pytest.raises(VlprepError, match="unknown dataset"):
        ids.volta_id("/x/abc.jpg", "vqa")
    assert ids.split_of("gs://b/val2014/COCO_val2014_000000000001.jpg") == "val2014"


@pytest.mark.parametrize("img_id,dataset", [("COCO_val2014_000000000009", "coco"), ("COCO_test2015_000000123456", "coco"),
                                            ("1000092795", "flickr30k"), (1000092795, "flickr30k")])
def test_lmdb_key_is_the_format_modules_rule(img_id, dataset):
    assert ids.lmdb_key(img_id, dataset) == volta_lmdb.lmdb_key(img_id, dataset)
    with pytest.raises(VlprepError):
        ids.lmdb_key("x", "vqa")


def test_caption_ids():
    assert ids.caption_id({"id": 9, "sentences": []}, "coco") == 9
    assert ids.caption_id({"id": "1000092795", "img_path": "1000092795.jpg"}, "flickr30k") == 1000092795


def test_context_keys_order_and_hdf5_names():
    assert ids.context_key("gs://b/train2014/COCO_train2014_000000531912.jpg") == 531912
    assert ids.context_key("/x/1000092795.jpg") == 1000092795
    assert ids.context_key("/x/cat.png") == "cat" and ids.context_key("/x/img_v2.png") == "img_v2"
    assert sorted([3, "b", 12, "a"], key=ids.key_order) == [3, 12, "a", "b"]
    for key in (531912, "000042", "cat", "img_v2"):
        assert ids.entry_name(key) == ctx_h5.entry_name(key)
    with pytest.raises(VlprepError, match="cannot name"):
        ids.entry_name("a/b")
