"""Region features (VOLTA / LXMERT): bottom-up-attention detector -> TSV shards -> merged TSV -> LMDB.

Steps (each a KFP component; ``run`` does them all in one process):
- ``plan``: sorted image list (a COCO root with split folders, a Flickr30k folder, a list file or a
  Karpathy file) split into shards.
- ``extract`` (one GPU pod per shard): images decoded in DataLoader workers, batched by the detector
  so that batching never changes an image's result (``models/detection`` buckets by resized size), one
  13-field VOLTA TSV part per image folder (COCO split). Undecodable images are skipped and listed
  in the done-marker.
- ``merge``: per split, ``volta/{split}_obj{lo}-{hi}.tsv`` (13 fields) and
  ``lxmert/{split}_obj{lo}-{hi}.tsv`` (LXMERT's 10) — or ``h5/{split}_obj....h5`` — plus an HTML
  report with boxes and labels drawn on sample images.
- ``lmdb``: VOLTA's LMDBs (COCO ``trainval_feat.lmdb`` = train2014 + val2014, ``test_feat.lmdb`` =
  test2015; Flickr30k ``flickr30k_feat.lmdb``), streamed.
- ``hard_negatives``: ``hard_negative.pkl`` from the train annotations and the features.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np

from vlprep import VlprepError, shards, storage
from vlprep.data import images as imgs

log = logging.getLogger("vlprep.regions")

STAGE = "regions"
FORMATS = ("volta-tsv", "lxmert-tsv", "h5")
# COCO split folders -> VOLTA LMDB name; any other folder gets {folder}_feat.lmdb
COCO_LMDB = {"train2014": "trainval_feat.lmdb", "val2014": "trainval_feat.lmdb", "test2015": "test_feat.lmdb"}


def work_dir(out: str) -> str:
    return storage.join(out, "_work", STAGE)


def box_range(recipe: str, recipe_params: dict | None = None) -> tuple[int, int]:
    from vlprep.models.detection.selection import get_recipe

    return get_recipe(recipe, **(recipe_params or {})).box_range


def tsv_name(split: str, recipe: str, recipe_params: dict | None = None) -> str:
    lo, hi = box_range(recipe, recipe_params)
    return f"{split}_obj{lo}-{hi}.tsv"


def plan(images: str, out: str, num_shards: int = 1, image_root: str = "", split: str = "balanced") -> list[dict]:
    return shards.plan(imgs.list_images(images, image_root), num_shards, work_dir(out), split)


class _Decoded:
    """A torch Dataset over a shard's image URIs: bytes read from the store and decoded in workers."""

    def __init__(self, items: list[str]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        uri = self.items[i]
        try:
            bgr, note = imgs.decode_bgr(storage.read_bytes(uri), uri)
            return i, bgr, note, None
        except (imgs.BadImage, OSError) as e:
            return i, None, "", str(e)


def _loader(items: list[str], num_workers: int, prefetch: int):
    from torch.utils.data import DataLoader

    return DataLoader(_Decoded(items), batch_size=prefetch, num_workers=num_workers, collate_fn=list,
                      shuffle=False, persistent_workers=False)


def load_detector(weights: str, device: str = "cpu", arch: str = "full", autocast: str = "",
                  channels_last: bool = False):
    from vlprep.models.detection import butd

    cfg = butd.BUTDConfig.tiny() if arch == "tiny" else butd.BUTDConfig()
    return butd.load_detector(weights, config=cfg, device=device, autocast_dtype=autocast or None,
                              channels_last=channels_last)


def extract(spec: dict, dataset: str = "coco", recipe: str = "caffe36", weights: str = "random:0",
            device: str = "cpu", batch_size: int = 8, num_workers: int = 2, arch: str = "full",
            recipe_params: dict | None = None, autocast: str = "", detector=None) -> dict:
    """Extract one shard: a 13-field VOLTA TSV part per image folder, then the done-marker."""
    from vlprep.formats import volta_tsv
    from vlprep.models.detection.selection import get_recipe

    rec = get_recipe(recipe, **(recipe_params or {}))
    lo, _ = box_range(recipe, recipe_params)
    params = {"dataset": dataset, "recipe": recipe, "recipe_params": recipe_params or {}, "weights": weights,
              "arch": arch, "autocast": autocast}

    def work(shard: shards.Shard) -> dict:
        model = detector or load_detector(weights, device, arch, autocast, channels_last=device.startswith("cuda"))
        failed, notes, buffers = [], [], {}
        t0, done, t_model = time.time(), 0, 0.0
        for batch in _loader(shard.items, num_workers, max(batch_size * 4, 1)):  # room to bucket by size
            good = []
            for i, bgr, note, err in batch:
                uri = shard.items[i]
                if err:
                    failed.append({"item": uri, "error": err})
                    log.warning("skipped %s: %s", uri, err)
                elif note:
                    notes.append({"item": uri, "note": note})
                if bgr is not None:
                    good.append((uri, bgr))
            tm = time.time()
            results = model.extract([b for _, b in good], rec, batch_size=batch_size) if good else []
            t_model += time.time() - tm
            for (uri, _), r in zip(good, results, strict=True):
                if r["num_boxes"] < lo and recipe == "d2-maxnms36-volta":
                    failed.append({"item": uri, "error": f"only {r['num_boxes']} boxes (VOLTA skips these)"})
                    continue
                record = volta_tsv.volta_record(r, imgs.image_id(uri, dataset))
                buf = buffers.setdefault(imgs.split_of(uri), io.StringIO(newline=""))
                volta_tsv.TsvWriter(buf).write(record)
            done += len(batch)
            rate = done / max(time.time() - t0, 1e-9)
            log.info("%s: %d/%d images (%.2f img/s, %d failed)", shard.tag, done, len(shard.items), rate, len(failed))
        parts = []
        for split, buf in sorted(buffers.items()):
            storage.write_text(shard.part(f"{split}.tsv"), buf.getvalue())
            parts.append(f"{split}.tsv")
        seconds = time.time() - t0
        return {"parts": parts, "failed": failed, "notes": notes, "images": len(shard.items) - len(failed),
                "extract_seconds": round(seconds, 3), "model_seconds": round(t_model, 3),
                "random_weights": bool(getattr(model, "is_random", False))}

    return shards.run_shard(spec, work, STAGE, params)


def _parts_by_split(done) -> dict[str, list]:
    out: dict[str, list] = {}
    for shard, marker in done:
        for p in marker["parts"]:
            out.setdefault(p["name"].removesuffix(".tsv"), []).append(shard.part(p["name"]))
    return out


def merge(out: str, dataset: str = "coco", recipe: str = "caffe36", formats: str = "volta-tsv,lxmert-tsv",
          recipe_params: dict | None = None, vocab_objects: str = "", vocab_attributes: str = "",
          report_samples: int = 6) -> dict:
    """Merge verified shard parts per split into the requested formats; returns a summary with the report."""
    from vlprep.formats import region_h5, volta_tsv

    wanted = [f.strip() for f in formats.split(",") if f.strip()]
    bad = [f for f in wanted if f not in FORMATS]
    if bad:
        raise VlprepError(f"unknown format(s) {bad}; use some of {', '.join(FORMATS)}")
    done = shards.collect(storage.join(work_dir(out), "plan.json"))
    summary = {"stage": STAGE, "dataset": dataset, "recipe": recipe, "out": out, "files": {}, "shards": len(done),
               "images": sum(m.get("images", 0) for _, m in done),
               "failed": [f for _, m in done for f in m["failed"]],
               "notes": [n for _, m in done for n in m.get("notes", [])],
               "extract_seconds": round(sum(m.get("extract_seconds", 0) for _, m in done), 3),
               "model_seconds": round(sum(m.get("model_seconds", 0) for _, m in done), 3),
               "random_weights": any(m.get("random_weights") for _, m in done)}
    for split, parts in sorted(_parts_by_split(done).items()):
        name = tsv_name(split, recipe, recipe_params)
        with _local_parts(parts) as local:
            if "volta-tsv" in wanted:
                uri = storage.join(out, "volta", name)
                with storage.local_file_for(uri) as dst:
                    summary["files"][uri] = volta_tsv.merge_tsv(local, dst)["rows"]
            if "lxmert-tsv" in wanted:
                uri = storage.join(out, "lxmert", name)
                with storage.local_file_for(uri) as dst:
                    summary["files"][uri] = volta_tsv.merge_tsv(local, dst, fields=volta_tsv.LXMERT_FIELDS)["rows"]
            if "h5" in wanted:
                uri = storage.join(out, "h5", name.replace(".tsv", ".h5"))
                with storage.local_file_for(uri) as dst:
                    records = (volta_tsv.decode_row(r) for p in local for r in volta_tsv.read_tsv(p, raw=True))
                    summary["files"][uri] = region_h5.write_region_h5(dst, records, overwrite=True)
    summary["report_html"] = report_html(done, summary, vocab_objects, vocab_attributes, report_samples)
    return summary


class _local_parts:
    """Local copies of part URIs (no copy for local paths)."""

    def __init__(self, uris: list[str]):
        self.uris, self._stack = uris, None

    def __enter__(self) -> list[str]:
        import contextlib

        self._stack = contextlib.ExitStack()
        return [str(self._stack.enter_context(storage.local_copy(u))) for u in self.uris]

    def __exit__(self, *exc):
        self._stack.close()


def lmdb(out: str, dataset: str = "coco", recipe: str = "caffe36", recipe_params: dict | None = None) -> dict:
    """VOLTA's LMDBs from the merged 13-field TSVs (streamed; built beside the target, then renamed)."""
    from vlprep.formats import volta_lmdb

    tsvs = [u for u in storage.list_prefix(storage.join(out, "volta")) if u.endswith(".tsv")]
    if not tsvs:
        raise VlprepError(f"{storage.join(out, 'volta')}: no merged VOLTA TSVs; run the merge step first")
    groups: dict[str, list[str]] = {}
    for uri in tsvs:
        split = Path(uri).name.split("_obj")[0]
        target = "flickr30k_feat.lmdb" if dataset == "flickr30k" else COCO_LMDB.get(split, f"{split}_feat.lmdb")
        groups.setdefault(target, []).append(uri)
    order = {"train2014": 0, "val2014": 1}  # upstream: train2014 then val2014
    built = {}
    for target, uris in sorted(groups.items()):
        uris.sort(key=lambda u: (order.get(Path(u).name.split("_obj")[0], 9), u))
        dst_uri = storage.join(out, target)
        with _local_parts(uris) as local, storage.local_dir_for(dst_uri) as tmp:
            # the builder writes beside tmp and swaps it in; local_dir_for then publishes tmp
            built[dst_uri] = volta_lmdb.build_lmdb_from_tsv(local, str(tmp), dataset, overwrite=True)["records"]
    return {"lmdb": built}


def hard_negatives(out: str, annotations: str, dataset: str = "coco") -> dict:
    """``hard_negative.pkl``: 100 nearest training images by mean-pooled region feature (faiss)."""
    from vlprep.formats import hard_negatives as hn

    ann = storage.join(annotations, "train_ann.jsonl")
    if not storage.exists(ann):
        raise VlprepError(f"{ann}: missing; run the captions stage first (hard negatives follow its order)")
    ids = []
    for line in storage.read_text(ann).splitlines():
        row = json.loads(line)
        ids.append(int(Path(row["img_path"]).stem) if dataset == "flickr30k" else int(row["id"]))
    tsvs = [u for u in storage.list_prefix(storage.join(out, "volta")) if u.endswith(".tsv")]
    with _local_parts(tsvs) as local:
        present = {i for p in local for i, _ in hn.mean_features_tsv(p, dataset)}
        train = [i for i in ids if i in present]
        if len(train) < 2:
            raise VlprepError(f"{ann}: only {len(train)} training image(s) have features; need at least 2")
        feats = (x for p in local for x in hn.mean_features_tsv(p, dataset) if x[0] in set(train))
        pool = hn.build_hard_negatives(train, feats)
    uri = storage.join(out, "hard_negative.pkl")
    with storage.local_file_for(uri) as dst:
        hn.write_hard_negatives(dst, pool)
    return {"hard_negatives": uri, "train_images": len(train), "missing_features": len(ids) - len(train),
            "pool_size": int(np.asarray(pool["train_hard_pool"]).shape[1])}


def report_html(done, summary: dict, vocab_objects: str = "", vocab_attributes: str = "", samples: int = 6) -> str:
    """Boxes with object/attribute labels on the first images, counts and throughput."""
    import html

    from vlprep import report
    from vlprep.formats import volta_tsv
    from vlprep.models import weights as wts

    objects = wts.load_vg_objects(vocab_objects) if vocab_objects else [f"object_{i}" for i in range(1600)]
    attributes = wts.load_vg_attributes(vocab_attributes) if vocab_attributes else [f"attr_{i}" for i in range(400)]
    figures = []
    for shard, marker in done:
        for p in marker["parts"]:
            if len(figures) >= samples:
                break
            with storage.open_read(shard.part(p["name"])) as f:
                rows = volta_tsv.iter_rows(io.TextIOWrapper(f, encoding="utf-8", newline=""))
                for row in rows:
                    if len(figures) >= samples:
                        break
                    r = volta_tsv.decode_row(row, keys=["boxes", "obj_ids", "attr_ids"])
                    uri = next((u for u in shard.items if imgs.image_id(u, summary["dataset"]) == r["img_id"]
                                or str(imgs.image_id(u, summary["dataset"])) == str(r["img_id"])), None)
                    if uri is None:
                        continue
                    bgr, _ = imgs.decode_bgr(storage.read_bytes(uri), uri)
                    keep = min(10, r["num_boxes"])
                    labels = [f"{attributes[a]} {objects[o]}" for a, o in zip(r["attr_ids"][:keep], r["obj_ids"][:keep],
                                                                            strict=True)]
                    im = report.draw_boxes(bgr[:, :, ::-1], r["boxes"][:keep], labels)
                    figures.append(f"<figure><img src='{report.png_data_uri(im)}'><figcaption>"
                                   f"{html.escape(str(r['img_id']))}: {r['num_boxes']} boxes (first {keep} drawn)"
                                   "</figcaption></figure>")
    secs = summary["extract_seconds"] or 1e-9
    warn = ("<p style='color:#b00'><b>RANDOM weights</b>: boxes and labels are not meaningful; pass a real "
            "weights spec.</p>") if summary["random_weights"] else ""
    rows = [{"file": k, "rows": v} for k, v in summary["files"].items()]
    stats = [{"images": summary["images"], "failed": len(summary["failed"]), "shards": summary["shards"],
              "images/s (per pod)": f"{summary['images'] / secs:.2f}",
              "model share of time": f"{summary['model_seconds'] / secs:.0%}"}]
    failed = "".join(f"<li>{html.escape(f['item'])}: {html.escape(f['error'])}</li>" for f in summary["failed"])
    body = (f"{warn}<p>recipe <code>{summary['recipe']}</code>, dataset {summary['dataset']}</p>"
            + _html_table(stats) + "<h2>Files</h2>" + _html_table(rows)
            + (f"<h2>Skipped images</h2><ul>{failed}</ul>" if failed else "")
            + "<h2>Samples</h2>" + "".join(figures))
    return report.html_page("Region features", body)


def _html_table(rows: list[dict]) -> str:
    import html

    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def run(images: str, out: str, dataset: str = "coco", recipe: str = "caffe36", weights: str = "random:0",
        num_shards: int = 1, formats: str = "volta-tsv,lxmert-tsv", device: str = "cpu", batch_size: int = 8,
        num_workers: int = 2, arch: str = "full", image_root: str = "", recipe_params: dict | None = None,
        build_lmdb: bool = True, annotations: str = "") -> dict:
    """plan -> every shard (done ones skipped) -> merge [-> LMDB -> hard negatives], in this process."""
    specs = plan(images, out, num_shards, image_root)
    detector = None
    for spec in specs:
        if shards.verify(shards.load(spec)) is None and detector is None:
            detector = load_detector(weights, device, arch)
        extract(spec, dataset, recipe, weights, device, batch_size, num_workers, arch, recipe_params,
                detector=detector)
    summary = merge(out, dataset, recipe, formats, recipe_params)
    storage.write_text(storage.join(out, "report.html"), summary.pop("report_html"))
    if build_lmdb and "volta-tsv" in formats:
        summary.update(lmdb(out, dataset, recipe, recipe_params))
    if annotations:
        summary.update(hard_negatives(out, annotations, dataset))
    return summary
