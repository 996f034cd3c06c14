"""The region-feature report: boxes with object/attribute labels on the first images, counts, throughput."""

from __future__ import annotations

from vlprep import storage
from vlprep.data import images as imgs
from vlprep.reports import html


def _labels(vocab_objects: str, vocab_attributes: str) -> tuple[list[str], list[str]]:
    from vlprep.models import weights as wts

    objects = wts.load_vg_objects(vocab_objects) if vocab_objects else [f"object_{i}" for i in range(1600)]
    attributes = wts.load_vg_attributes(vocab_attributes) if vocab_attributes else [f"attr_{i}" for i in range(400)]
    return objects, attributes


def _figure(sample: dict, objects: list[str], attributes: list[str]) -> str:
    rgb, _ = imgs.decode_rgb(storage.read_bytes(sample["uri"]), sample["uri"], exif=sample["exif"])
    keep = min(10, sample["num_boxes"])
    labels = [f"{attributes[a]} {objects[o]}"
              for a, o in zip(sample["attr_ids"][:keep], sample["obj_ids"][:keep], strict=True)]
    im = html.draw_boxes(rgb, sample["boxes"][:keep], labels)
    return html.figure(im, f"{sample['img_id']}: {sample['num_boxes']} boxes (first {keep} drawn)")


def regions_html(summary: dict, samples: list[dict], vocab_objects: str = "", vocab_attributes: str = "") -> str:
    """``samples``: ``{uri, exif, img_id, num_boxes, boxes, obj_ids, attr_ids}`` of the images to draw
    (``exif``: decode as the extraction did, so that the boxes fall where they were found)."""
    objects, attributes = _labels(vocab_objects, vocab_attributes)
    figures = [_figure(s, objects, attributes) for s in samples]
    secs = summary["extract_seconds"] or 1e-9
    warn = ("<p style='color:#b00'><b>RANDOM weights</b>: boxes and labels are not meaningful; pass a real "
            f"weights spec.{html.fallback(summary)}</p>") if summary["random_weights"] else ""
    rows = [{"file": k, "rows": v} for k, v in summary["files"].items()]
    stats = [{"images": summary["images"], "failed": len(summary["failed"]), "shards": summary["shards"],
              "images/s (per pod)": f"{summary['images'] / secs:.2f}",
              "model share of time": f"{summary['model_seconds'] / secs:.0%}"}]
    failed = "".join(f"<li>{html.escape(f['item'])}: {html.escape(f['error'])}</li>" for f in summary["failed"])
    body = (f"{warn}<p>recipe <code>{html.escape(summary['recipe'])}</code>, dataset {html.escape(summary['dataset'])}"
            "</p>" + html.table(stats) + "<h2>Files</h2>" + html.table(rows)
            + (f"<h2>Skipped images</h2><ul>{failed}</ul>" if failed else "")
            + "<h2>Samples</h2>" + "".join(figures))
    return html.page("Region features", body)
