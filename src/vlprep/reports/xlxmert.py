"""The X-LXMERT reports: the grid / the 36 boxes drawn on sample images; the visual vocabulary's largest
clusters as the grid cells assigned to them, side by side, and the cluster-size histogram."""

from __future__ import annotations

import numpy as np

from vlprep import storage
from vlprep.data import images as imgs
from vlprep.formats.xlxmert_h5 import grid_boxes
from vlprep.reports import html

CROP = 72  # px: the side of a cell crop in the cluster rows

_RANDOM = ("<p style='color:#b00'><b>RANDOM weights</b>: features and clusters are not meaningful; pass a real "
           "weights spec.</p>")


def _rgb(uri: str) -> np.ndarray:
    rgb, _ = imgs.decode_rgb(storage.read_bytes(uri), uri, exif=False)  # as the extraction decoded it
    return rgb


def cell_box(cell: int, grid: int, width: int, height: int) -> tuple[float, float, float, float]:
    """Cell ``cell`` (row-major) of a ``grid`` x ``grid`` grid in the image's pixels. The extraction's cells
    are whole pixels of the /32-floored resized image; scaled back they are these up to a pixel or two."""
    x1, y1, x2, y2 = grid_boxes(grid)[cell]
    return x1 * width, y1 * height, x2 * width, y2 * height


def _sample_figure(info: dict, record: dict, kind: str) -> str:
    rgb = _rgb(info["image"])
    h, w = rgb.shape[:2]
    if kind.startswith("grid"):
        grid = record["features"].shape[0]
        boxes = [cell_box(c, grid, w, h) for c in range(grid * grid)]
        norms = np.linalg.norm(record["features"].reshape(grid * grid, -1), axis=1)
        labels = [""] * len(boxes)
        caption = (f"{info['stem']}: {grid}x{grid} grid; feature norm per cell {norms.min():.1f} to {norms.max():.1f}")
    else:
        boxes, labels = record["boxes"], [f"obj {int(o)}" for o in record["obj_id"]]
        caption = f"{info['stem']}: {len(boxes)} boxes (labels: 0-based VG class ids)"
    return html.figure(html.draw_boxes(rgb, boxes, labels), caption)


def features_html(summary: dict, samples: list[tuple[dict, dict]]) -> str:
    """``samples``: ``(info {stem, image}, record)`` as the shard parts hold them."""
    secs = summary["extract_seconds"] or 1e-9
    stats = [{"images": summary["images"], "failed": len(summary["failed"]), "shards": summary["shards"],
              "images/s (per pod)": f"{summary['images'] / secs:.2f}",
              "model share of time": f"{summary['model_seconds'] / secs:.0%}"}]
    files = [{"file": k, "images": v} for k, v in summary["files"].items()]
    failed = "".join(f"<li>{html.escape(f['item'])}: {html.escape(f['error'])}</li>" for f in summary["failed"])
    notes = "".join(f"<li>{html.escape(n['item'])}: {html.escape(n['note'])}</li>" for n in summary["notes"])
    size = f", imsize {summary['imsize']}" if summary["imsize"] else ""
    body = ((_RANDOM.replace("</p>", html.fallback(summary) + "</p>") if summary["random_weights"] else "")
            + f"<p>kind <code>{html.escape(summary['kind'])}</code>{html.escape(size)}, dataset "
            f"{html.escape(summary['dataset'])}, arch {html.escape(summary['arch'])}, weights "
            f"<code>{html.escape(summary['weights'])}</code></p>" + html.table(stats) + "<h2>Files</h2>"
            + html.table(files) + (f"<h2>Skipped images</h2><ul>{failed}</ul>" if failed else "")
            + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
            + "<h2>Samples</h2>" + "".join(_sample_figure(i, r, summary["kind"]) for i, r in samples))
    return html.page(f"X-LXMERT {summary['kind']} features", body)


def size_bins(sizes: np.ndarray) -> list[tuple[str, int]]:
    """(label, clusters) per size bin: 0, 1, 2-3, 4-7, ... up to the largest cluster."""
    top = int(sizes.max(initial=0))
    bins, lo = [("0", int((sizes == 0).sum()))], 1
    while lo <= top:
        hi = 2 * lo - 1
        bins.append((str(lo) if lo == hi else f"{lo}-{hi}", int(((sizes >= lo) & (sizes <= hi)).sum())))
        lo *= 2
    return bins


def _histogram(name: str, sizes: np.ndarray) -> str:
    bins = size_bins(sizes)
    most = max(c for _, c in bins) or 1
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td style='width:320px'><div style='background:#4a7bd0;height:12px;"
        f"width:{round(300 * count / most)}px'></div></td><td>{count}</td></tr>" for label, count in bins)
    return (f"<h3>{html.escape(name)}: {int(sizes.sum())} cells in {int((sizes > 0).sum())} of {len(sizes)} clusters"
            f"</h3><table><tr><th>cells per cluster</th><th></th><th>clusters</th></tr>{rows}</table>")


def _crop(uri: str, cell: int, grid: int, cache: dict) -> np.ndarray:
    from PIL import Image

    if uri not in cache:
        cache.clear()  # members come image by image: one decoded image at a time
        cache[uri] = _rgb(uri)
    rgb = cache[uri]
    x1, y1, x2, y2 = (round(v) for v in cell_box(cell, grid, rgb.shape[1], rgb.shape[0]))
    im = Image.fromarray(rgb[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]).resize((CROP, CROP), Image.BILINEAR)
    return np.asarray(im)


def _cluster_rows(views: dict, src: str) -> str:
    if not views["images_found"]:
        return "<p>The images of the source were not found (give the image folder): no cells to show.</p>"
    cache: dict = {}
    rows = []
    for cluster, members in views["members"].items():
        crops = [_crop(uri, cell, views["grid"], cache) for uri, cell in members]
        size = int(views["sizes"][src][cluster])
        strip = np.concatenate(crops, axis=1) if crops else np.zeros((CROP, CROP, 3), np.uint8)
        rows.append(html.figure(strip, f"cluster {cluster}: {size} cells in {src} (first {len(crops)} shown)"))
    return "<br>".join(rows)


def clusters_html(summary: dict, views: dict) -> str:
    """``views``: ``sizes`` {target: int [K]}, ``members`` {cluster: [(image URI, cell)]}, ``grid``,
    ``images_found``."""
    vocab = summary["vocabulary"]
    targets = [{"target": n, **t} for n, t in summary["targets"].items()]
    files = [{"file": k, "rows": v} for k, v in summary["files"].items()]
    body = ((_RANDOM.replace("</p>", html.fallback(summary) + "</p>") if summary["random_weights"] else "")
            + f"<p>k-means on <code>{html.escape(vocab['src'])}</code>: K={vocab['k']}, {vocab['niter']} iterations, "
            f"d={vocab['dim']}, grid {vocab['grid_size']}; centroids <code>{html.escape(summary['centroids'])}</code></p>"
            + html.table(targets) + "<h2>Files</h2>" + html.table(files)
            + f"<h2>The {len(views['members'])} largest clusters of {html.escape(vocab['src'])}</h2>"
            + _cluster_rows(views, vocab["src"])
            + "<h2>Cluster sizes</h2>" + "".join(_histogram(n, s) for n, s in views["sizes"].items()))
    return html.page("X-LXMERT visual vocabulary", body)
