"""The cross-modal context report: counts, skipped images, and each sample with its crops drawn and
the top phrases of the whole image and of every crop."""

from __future__ import annotations

from vlprep import storage
from vlprep.data import images as imgs
from vlprep.reports import html


def _top_table(title: str, texts: list, scores: list, n: int = 3) -> str:
    rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{s:.3f}</td></tr>"
                   for t, s in list(zip(texts, scores, strict=True))[:n])
    return (f"<table style='display:inline-block;vertical-align:top;margin:4px'>"
            f"<tr><th colspan=2>{html.escape(title)}</th></tr>{rows}</table>")


def _rgb(uri: str):
    try:
        rgb, _ = imgs.decode_rgb(storage.read_bytes(uri), uri, exif=False)  # as the stage decoded it
    except (imgs.BadImage, FileNotFoundError):
        return None
    return rgb


def _sample(s: dict, top: int) -> list[str]:
    from vlprep.models import crops

    out = [f"<h2>image {html.escape(s['key'])}</h2><p><code>{html.escape(s['uri'])}</code></p>"]
    w, h = s["size"]
    rgb = _rgb(s["uri"])
    v = s["views"]
    out.append("<div>" + _top_table("whole image", v["whole"]["texts"], v["whole"]["scores"], top) + "</div>")
    for view, boxes in (("five", crops.five_crop_boxes(w, h)), ("nine", crops.nine_crop_boxes(w, h))):
        labels = [str(i + 1) for i in range(len(boxes))]
        if rgb is not None:
            out.append(html.figure(html.draw_boxes(rgb, boxes, labels), f"{view} crops"))
        out.append("<div>" + "".join(
            _top_table(f"{view} crop {i + 1}", v[view]["texts"][i], v[view]["scores"][i], top)
            for i in range(len(boxes))) + "</div>")
    return out


def context_html(summary: dict, samples: list[dict], top: int = 3) -> str:
    """``samples``: ``{key, uri, size, views: {view: {texts, scores}}}`` of the images to show."""
    parts = []
    if summary["random_weights"]:
        parts.append("<p><b>RANDOM weights: these phrases are not meaningful (a test or demo run).</b>"
                     f"{html.fallback(summary)}</p>")
    info = [{"what": k, "value": summary.get(k, "-")} for k in ("recipe", "images", "phrases", "index", "nprobe", "topk")]
    info += [{"what": f"weights ({r})", "value": d} for r, d in summary["weights"].items()]
    parts.append(html.table(info))
    parts.append(f"<h2>Skipped images ({len(summary['failed'])})</h2>")
    parts.append("<ul>" + "".join(f"<li><code>{html.escape(f['item'])}</code>: {html.escape(f['error'])}</li>"
                                  for f in summary["failed"]) + "</ul>" if summary["failed"] else "<p>none</p>")
    for s in samples:
        parts += _sample(s, top)
    return html.page(f"Cross-modal context ({summary['recipe']})", "\n".join(parts))
