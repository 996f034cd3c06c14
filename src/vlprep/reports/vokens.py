"""The vokenization report: counts, skipped images and lines, throughput, and sample lines with their
top-k images shown beside them (inline thumbnails)."""

from __future__ import annotations

from vlprep.data.images import BadImage
from vlprep.models.matching.images import read_rgb
from vlprep.reports import html

THUMB = 96


def _thumb(image: dict) -> str:
    caption = f"{image['voken']} ({image['score']:.3f})"
    try:
        im = read_rgb(image["uri"])  # the keys' paths are the URIs they were read from
    except BadImage:  # a picture that cannot be read (e.g. a path relative elsewhere) leaves its name
        return f"<figure><figcaption>{html.escape(caption)}</figcaption></figure>"
    im.thumbnail((THUMB, THUMB))
    return html.figure(im, caption)


def _stats(summary: dict) -> tuple[list[dict], list[dict]]:
    tok = summary["tokenize"] or {}
    rows = [{"what": "corpus lines", "value": tok.get("lines", "-")},
            {"what": "entries vokenized (lines of the vokens file)", "value": summary["lines"]},
            {"what": "lines without tokens", "value": tok.get("empty_lines", "-")},
            {"what": "lines dropped (--drop-empty)", "value": tok.get("dropped_lines", "-")},
            {"what": "over-length lines (first segment used)", "value": summary["segmented"]},
            {"what": "images in the index", "value": summary["images"]},
            {"what": "image sets", "value": ", ".join(summary["image_sets"])},
            {"what": "top-k", "value": summary["topk"]},
            {"what": "matcher", "value": summary["matcher"]}]
    speed = [{"step": "tokenize", "throughput": f"{tok['lines_per_second']} lines/s"}] if tok.get("lines_per_second") else []
    speed += [{"step": f"keys ({name})", "throughput": f"{k['images_per_second']} images/s"}
              for name, k in summary["keys"].items() if k and k.get("images_per_second")]
    if summary["lines_per_second"]:
        speed.append({"step": "vokenize", "throughput": f"{summary['lines_per_second']} lines/s"})
    return rows, speed


def vokens_html(summary: dict, samples: list[dict]) -> str:
    """``samples``: ``{entry, text, images: [{uri, voken, score}]}`` of the lines to show."""
    parts = []
    if summary["random_weights"]:
        parts.append("<p style='color:#b00'><b>RANDOM matcher weights</b>: these images are not meaningful "
                     "(a test or demo run); pass a trained BEST.pth.</p>")
    rows, speed = _stats(summary)
    parts.append(html.table(rows))
    parts.append("<h2>Throughput (per task)</h2>" + html.table(speed))
    failed = [(name, f) for name, k in summary["keys"].items() if k for f in k["failed"]]
    parts.append(f"<h2>Skipped images ({len(failed)})</h2>")
    parts.append("<ul>" + "".join(f"<li>{html.escape(name)}/<code>{html.escape(f['item'])}</code>: "
                                  f"{html.escape(f['error'])}</li>" for name, f in failed) + "</ul>"
                 if failed else "<p>none</p>")
    if summary["tokenize"] is None:
        parts.append("<p>The corpus was tokenized elsewhere: no line counts.</p>")
    parts.append(f"<h2>Sample lines and their top {summary['topk']} images</h2>")
    body = "".join(f"<tr><td>{s['entry']}</td><td>{html.escape(s['text'])}</td><td>"
                   + "".join(_thumb(im) for im in s["images"]) + "</td></tr>" for s in samples)
    parts.append(f"<table><tr><th>entry</th><th>text (decoded tokens)</th><th>images</th></tr>{body}</table>")
    parts.append(f"<p>vokens: <code>{html.escape(summary['vokens'])}</code></p>")
    return html.page("Vokenization (Maria)", "\n".join(parts))

