"""Run reports: Markdown and HTML that the KFP UI renders (and that a local run writes to disk)."""

from __future__ import annotations

import html
import json


def md_table(rows: list[dict]) -> str:
    if not rows:
        return "_(none)_\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def captions_markdown(summary: dict) -> str:
    rows = [{"file": k, "images": v} for k, v in summary["files"].items() if k.endswith(".jsonl")]
    text = f"# Caption annotations ({summary['dataset']})\n\nWritten to `{summary['out']}` from {summary['shards']} shard(s).\n\n"
    text += md_table(rows)
    missing = summary["files"].get("test1k_missing_ids")
    if missing:
        text += f"\n**{missing} id(s) of the test1k list are not in the Karpathy file.**\n"
    return text


def html_page(title: str, body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px}figure{display:inline-block;margin:4px}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def run_markdown(run: dict) -> str:
    """The report of a whole local run: where every output is."""
    lines = [f"# vlprep run `{run['run_name']}`", "", f"pipeline: `{run['pipeline']}`", ""]
    lines += ["## Outputs", ""] + [f"- `{p}`" for p in run.get("outputs", [])]
    lines += ["", "## Parameters", "", "```json", json.dumps(run["params"], indent=1), "```", ""]
    return "\n".join(lines)


def png_data_uri(rgb) -> str:
    """An RGB uint8 array (or PIL image) as an inline PNG, so one HTML file carries its pictures."""
    import base64
    import io

    from PIL import Image

    im = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def draw_boxes(rgb, boxes, labels, max_side: int = 480):
    """The image with boxes (x1, y1, x2, y2 in its pixels) and their labels drawn, scaled to ``max_side``."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(rgb).convert("RGB")
    scale = min(1.0, max_side / max(im.size))
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230)]
    for i, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        color = palette[i % len(palette)]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
        draw.text((x1 + 2, y1 + 1), str(label), fill=color)
    return im
