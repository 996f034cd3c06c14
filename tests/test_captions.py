"""Karpathy reader errors and the caption stage, byte for byte against upstream's logic."""

from __future__ import annotations

import json
from pathlib import Path

import jsonlines
import pytest

from vlprep import VlprepError
from vlprep.cli import main
from vlprep.stages import captions


def run_captions(karpathy, dataset: str, out, test1k_ids: str = "", num_shards: int = 1, **kw) -> dict:
    settings = captions.Settings(karpathy=str(karpathy), dataset=dataset, test1k_ids=str(test1k_ids))
    return captions.run(str(out), settings, num_shards=num_shards, **kw)


def upstream_captions(infile: Path, outdir: Path, dataset: str, test1k_ids: list[int] | None = None) -> None:
    """VOLTA's data/{mscoco,flickr30k}/extract_captions.py, as its .sh scripts run it (plus COCO test)."""
    lst = json.load(open(infile))["images"]
    splits = {"train": "train", "valid": "val", "test": "test"}
    if test1k_ids is not None:
        splits["test1k"] = "test1k"
    for name, split in splits.items():
        if split == "test1k":
            ids = set(test1k_ids)
            split_list = [e for e in lst if e["cocoid"] in ids]
        else:
            split_list = [e for e in lst if e["split"] == split]
        if dataset == "coco" and split == "train":
            split_list += [e for e in lst if e["split"] == "restval"]
        with jsonlines.open(outdir / f"{name}_ann.jsonl", mode="w") as writer:
            for e in split_list:
                sentences = [d["raw"] for d in e["sentences"]]
                if dataset == "coco":
                    writer.write({"sentences": sentences, "id": e["cocoid"]})
                else:
                    stem = e["filename"].split(".")[0]
                    writer.write({"sentences": sentences, "id": stem, "img_path": e["filename"]})


def synthetic_karpathy(path: Path, dataset: str, n: int = 23) -> Path:
    splits = ["train", "restval", "val", "test"] if dataset == "coco" else ["train", "val", "test"]
    images = []
    for i in range(n):
        e = {"split": splits[(i * 7) % len(splits)], "filename": f"{1000 + i}.jpg", "filepath": "x",
             "sentences": [{"raw": f"caption {i} \u00e9\u4e2d \"q\" \\ tab\t", "tokens": []},
                           {"raw": f"second {i}"}]}
        if dataset == "coco":
            e["cocoid"] = 500 - i
        images.append(e)
    path.write_text(json.dumps({"images": images}))
    return path


@pytest.mark.parametrize("dataset", ["coco", "flickr30k"])
@pytest.mark.parametrize("num_shards", [1, 4])
def test_same_bytes_as_upstream(tmp_path, dataset, num_shards):
    src = synthetic_karpathy(tmp_path / "k.json", dataset)
    ids = [500, 490, 481, 77] if dataset == "coco" else None
    ids_file = ""
    if ids:
        ids_file = str(tmp_path / "test1k_ids.txt")
        Path(ids_file).write_text("".join(f"{i}\n" for i in ids))
    (tmp_path / "up").mkdir()
    upstream_captions(src, tmp_path / "up", dataset, ids)
    summary = run_captions(src, dataset, tmp_path / "ours", ids_file, num_shards)
    names = sorted(p.name for p in (tmp_path / "up").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ours").glob("*.jsonl"))
    for name in names:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "up" / name).read_bytes(), name
    assert "é中" in (tmp_path / "ours" / "train_ann.jsonl").read_text(encoding="utf-8")  # unescaped UTF-8
    if ids:
        assert summary["files"]["test1k_missing_ids"] == 1  # 77 is not in the file


def test_sample_dataset(sample, tmp_path):
    run_captions(sample / "dataset_coco.json", "coco", tmp_path, sample / "test1k_ids.txt", 3)
    train = [json.loads(x) for x in (tmp_path / "train_ann.jsonl").read_text().splitlines()]
    assert [r["id"] for r in train] == [1, 2, 3]  # train then restval
    assert list(train[0]) == ["sentences", "id"]


@pytest.mark.parametrize(
    "doc,expect",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"imgs": []}), "missing key 'images'"),
        (json.dumps({"images": [{"split": "train", "filename": "a.jpg", "sentences": []},
                                {"split": "train", "filename": "b.jpg"}]}), r"images\[1\]: missing key 'sentences'"),
        (json.dumps({"images": [{"split": "dev", "filename": "a.jpg", "sentences": []}]}),
         r"images\[0\]\.split: unknown split 'dev'"),
        (json.dumps({"images": [{"split": "val", "filename": "a.jpg", "sentences": [{"tokens": []}]}]}),
         r"images\[0\]\.sentences\[0\]: missing key 'raw'"),
    ],
)
def test_malformed_input_one_clear_error_and_nothing_written(tmp_path, doc, expect):
    src = tmp_path / "dataset_flickr30k.json"
    src.write_text(doc)
    out = tmp_path / "out"
    with pytest.raises(VlprepError, match=expect) as e:
        run_captions(src, "flickr30k", out)
    assert str(src) in str(e.value)
    assert not out.exists()


def test_coco_needs_cocoid(tmp_path, capsys):
    src = tmp_path / "dataset_coco.json"
    src.write_text(json.dumps({"images": [{"split": "train", "filename": "a.jpg", "sentences": []}]}))
    assert main(["captions", "--karpathy", str(src), "--dataset", "coco", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "images[0]: missing key 'cocoid'" in err and str(src) in err
    assert not (tmp_path / "o").exists()


def test_bad_test1k_ids(tmp_path, sample):
    ids = tmp_path / "ids.txt"
    ids.write_text("12\nabc\n")
    with pytest.raises(VlprepError, match="line 2: 'abc' is not an integer"):
        run_captions(sample / "dataset_coco.json", "coco", tmp_path / "o", ids)


def test_gcs_output(gcs, sample):
    from vlprep import storage

    run_captions(sample / "dataset_coco.json", "coco", gcs, "", 2)
    assert storage.read_text(f"{gcs}/valid_ann.jsonl").count("\n") == 1
    assert f"{gcs}/train_ann.jsonl" in storage.list_prefix(gcs)
