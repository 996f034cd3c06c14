"""The report toolkit: HTML page and table (everything escaped here), inline PNGs, boxes, Markdown table."""

from __future__ import annotations

import html


def escape(value) -> str:
    return html.escape(str(value))


def fallback(summary: dict) -> str:
    """Why ``default`` weights became random ones (`` ...``), for a RANDOM banner; "" when they did not."""
    reason = summary.get("weights_fallback")
    return f" The published weights were not used: {escape(reason)}." if reason else ""


def table(rows: list[dict], style: str = "") -> str:
    """An HTML table of dicts (the first row's keys are the columns); every cell is escaped."""
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{escape(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    attrs = f" style='{style}'" if style else ""
    return f"<table{attrs}><tr>{head}</tr>{body}</table>"


def page(title: str, body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px}figure{display:inline-block;margin:4px}</style>"
        f"</head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )


def md_table(rows: list[dict]) -> str:
    if not rows:
        return "_(none)_\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def png_data_uri(rgb) -> str:
    """An RGB uint8 array (or PIL image) as an inline PNG, so one HTML file carries its pictures."""
    import base64
    import io

    from PIL import Image

    im = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure(im, caption: str) -> str:
    """An inline image with an (escaped) caption."""
    return f"<figure><img src='{png_data_uri(im)}'><figcaption>{escape(caption)}</figcaption></figure>"


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
