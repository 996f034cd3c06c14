"""The visual vocabulary: k-means on the source's grid cells, then every target's cluster ids, fanned out.

Steps: :func:`kmeans` (records the settings, trains once; ``vlprep.kmeans.train_kmeans`` reads only the
rows faiss trains on) -> :func:`assign_plan` (every target's images in blocks of ``ASSIGN_BLOCK``,
split into shards) -> :func:`assign` (one shard: ``assign_clusters`` per target range; equal to
upstream's one search over the whole target) -> :func:`assign_merge` (per target the cluster-index
``.npy`` and the image -> ids ``.pkl``, streamed in shard order; the report).

Files are X-LXMERT's (``vlprep.formats.clusters.Vocabulary``) under ``out/clustering/``.

Resume: the centroids are kept when a rerun has the same settings and the same source (its size and a
digest of its first and last MiB: a re-extraction with other weights changes both ends' features); the
assignment shards carry a fingerprint of the settings, the centroids' sha256 and the targets' keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import PurePosixPath

from vlprep import VlprepError, stage, storage
from vlprep.formats import clusters, open_h5
from vlprep.stages.xlxmert.extract import grid_files
from vlprep.stages.xlxmert.settings import ASSIGN, CLUSTERS_REPORT, VOCAB, VocabSettings, extraction_stage

log = logging.getLogger("vlprep.xlxmert")

ASSIGN_BLOCK = 1024  # images per plan item (the shards are contiguous runs of these)
KEY_BYTES = 1 << 20
REPORT_CLUSTERS = 6
REPORT_CELLS = 8


def targets(out: str, settings: VocabSettings) -> dict[str, str]:
    """``{name: grid HDF5 URI}``: the settings' feature specs, or the grid8 files extracted under ``out``."""
    if settings.features:
        return clusters.resolve_targets(settings.features, out, imsize=settings.imsize or None)
    return grid_files(out)


def _h5_facts(uri: str) -> tuple[int, tuple[int, ...]]:
    """(images, per-image feature shape) of a grid HDF5, reading only its metadata (ranged reads on gs://)."""
    try:
        with storage.open_read(uri) as raw, open_h5(raw, "X-LXMERT feature HDF5", name=uri) as f:
            keys = list(f.keys())
            if not keys or "features" not in f[keys[0]] or len(f[keys[0]]["features"].shape) != 3:
                raise VlprepError(f"{uri}: no grid features (an image group with features [G, G, D]); "
                                  "k-means needs grid8 files")
            return len(keys), tuple(f[keys[0]]["features"].shape)
    except FileNotFoundError:
        raise VlprepError(f"{uri}: no such feature file; extract grid8 features first or fix the path") from None
    except OSError as e:
        raise VlprepError(f"{uri}: not an HDF5 file ({e})") from None


def content_key(uri: str) -> str:
    """Size and sha256 of the first and last MiB: changes when a feature file is rewritten with other data."""
    n = storage.size(uri)
    h = hashlib.sha256(str(n).encode())
    with storage.open_read(uri) as f:
        h.update(f.read(KEY_BYTES))
        f.seek(max(0, n - KEY_BYTES))
        h.update(f.read(KEY_BYTES))
    return h.hexdigest()[:16]


def _gpu(runtime: stage.Runtime | None) -> bool | None:
    """faiss on the GPU when it has one, unless the runtime says cpu."""
    return False if runtime and runtime.device == "cpu" else None


def _trained_uri(out: str) -> str:
    return VOCAB.open(out).uri("centroids.done.json")


def trained(out: str) -> dict:
    """The k-means step's record (vocabulary fields, centroids URI and sha256, targets)."""
    try:
        return json.loads(storage.read_text(_trained_uri(out)))
    except FileNotFoundError:
        raise VlprepError(f"{out}: no trained vocabulary; run the k-means step first") from None


def kmeans(out: str, settings: VocabSettings, runtime: stage.Runtime | None = None) -> dict:
    """Train the centroids on the source (kept when the settings and the source are unchanged)."""
    settings.check()
    found = targets(out, settings)
    src = settings.src or next(iter(found))
    if src not in found:
        raise VlprepError(f"k-means source {src!r} is not among the features ({', '.join(found)}); "
                          "give it with --features / features")
    _, shape = _h5_facts(found[src])
    if settings.dim and settings.dim != shape[-1]:
        raise VlprepError(f"{found[src]}: features have {shape[-1]} values, dim={settings.dim}; pass dim={shape[-1]} "
                          "(or 0: the source's width)")
    VOCAB.start(out, settings)  # only now: a refused run leaves an earlier vocabulary's record as it was
    vocab = clusters.Vocabulary(src=src, k=settings.k, niter=settings.niter, dim=settings.dim or shape[-1],
                                grid_size=shape[0], imsize=settings.imsize or None)
    fingerprint = hashlib.sha256(f"{settings.fingerprint()}:{content_key(found[src])}".encode()).hexdigest()[:16]
    uri = storage.join(out, vocab.centroids_file())
    record = _kept(out, fingerprint, uri)
    skipped = record is not None
    if record is None:
        from vlprep import kmeans as km

        t0 = time.time()
        centroids = km.train_kmeans(found[src], k=vocab.k, niter=vocab.niter, dim=vocab.dim, seed=settings.seed,
                                    max_points_per_centroid=settings.max_points_per_centroid, nredo=settings.nredo,
                                    gpu=_gpu(runtime), verbose=False)
        clusters.write_centroids(uri, centroids)
        record = {"fingerprint": fingerprint, "centroids": uri, "sha256": storage.sha256(uri),
                  "vocabulary": {**{f: getattr(vocab, f) for f in ("src", "k", "niter", "dim", "grid_size")},
                                 "imsize": vocab.imsize or 0},  # 0, not None: KFP outputs carry no nulls
                  "gpu": km.use_gpu(_gpu(runtime)), "seconds": round(time.time() - t0, 3)}
    record["targets"] = found  # kept centroids too: the targets may have changed (say a new split extracted)
    record["generator_centroids"] = storage.join(out, vocab.generator_centroids_file())
    if not storage.exists(record["generator_centroids"]) or storage.sha256(record["generator_centroids"]) != record["sha256"]:
        storage.write_bytes(record["generator_centroids"], storage.read_bytes(uri))
    storage.write_text(_trained_uri(out), json.dumps(record, indent=1))
    return {**record, "skipped": skipped}


def _kept(out: str, fingerprint: str, uri: str) -> dict | None:
    """The earlier training's record if it used the same settings and source and its centroids are intact."""
    try:
        record = json.loads(storage.read_text(_trained_uri(out)))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != fingerprint or record.get("centroids") != uri or not storage.exists(uri):
        return None
    return record if storage.sha256(uri) == record.get("sha256") else None


def _vocabulary(record: dict) -> clusters.Vocabulary:
    fields = record["vocabulary"]
    return clusters.Vocabulary(**{**fields, "imsize": fields["imsize"] or None})


def assign_plan(out: str, *, num_shards: int = 1, split: str = "balanced", block: int = ASSIGN_BLOCK) -> list[dict]:
    """Every target's images in blocks of ``block`` (``name:start:stop``, targets in order) split into shards."""
    work, record = VOCAB.open(out), trained(out)
    items, keys = [], []
    for name, uri in record["targets"].items():
        n, _ = _h5_facts(uri)
        items += [f"{name}:{s}:{min(s + block, n)}" for s in range(0, n, block)]
        keys.append(f"{name}={content_key(uri)}")
    fingerprint = hashlib.sha256(
        ":".join([work.settings().fingerprint(), record["sha256"], *keys]).encode()).hexdigest()[:16]
    return work.plan(items, num_shards=num_shards, split=split, step=ASSIGN, fingerprint=fingerprint, sort=False)


def _ranges(items: list[str]) -> dict[str, tuple[int, int]]:
    """A shard's blocks joined into one [start, stop) per target (a shard's blocks of a target are contiguous)."""
    out: dict[str, tuple[int, int]] = {}
    for item in items:
        name, start, stop = item.rsplit(":", 2)
        lo, _ = out.get(name, (int(start), 0))
        out[name] = (lo, int(stop))
    return out


def assign(spec: dict, runtime: stage.Runtime | None = None) -> dict:
    """One shard: the cluster id of every grid cell of its image ranges, as parts per target."""
    from vlprep import kmeans as km

    def work(shard, work: stage.Work) -> dict:
        record = trained(work.out)
        vocab = _vocabulary(record)
        centroids = clusters.read_centroids(record["centroids"], vocab)
        names, counts = [], {}
        for name, (start, stop) in _ranges(shard.items).items():
            stems, ids = km.assign_clusters(record["targets"][name], centroids, start=start, stop=stop,
                                            gpu=_gpu(runtime))
            part = clusters.write_assignment_part(shard.part(name), stems, ids, grid_size=vocab.grid_size)
            names += [f"{name}/{p}" for p in part]
            counts[name] = len(stems)
        return {"parts": names, "failed": [], "targets": counts, "gpu": km.use_gpu(_gpu(runtime))}

    return VOCAB.run_shard(spec, work, step=ASSIGN, params={"device": runtime.device if runtime else "auto"})


def assign_merge(out: str) -> dict:
    """Per target, the shards' parts into X-LXMERT's cluster-index .npy and image -> ids .pkl; the report."""
    from vlprep.reports import xlxmert as report

    work, record = VOCAB.open(out), trained(out)
    vocab, done = _vocabulary(record), work.collect(ASSIGN)
    settings = work.settings()
    summary = {"stage": "xlxmert", "centroids": record["centroids"], "vocabulary": record["vocabulary"],
               "random_weights": _random_features(out, settings), "files": {}, "targets": {}, "shards": len(done)}
    for name in record["targets"]:
        prefixes = [shard.part(name) for shard, m in done if name in m.get("targets", {})]
        merged = clusters.merge_assignments(prefixes, index_uri=storage.join(out, vocab.cluster_index_file(name)),
                                            map_uri=storage.join(out, vocab.cluster_map_file(name)),
                                            grid_size=vocab.grid_size)
        summary["targets"][name] = {"images": merged["images"], "cells": merged["cells"]}
        summary["files"].update({merged["index"]: merged["cells"], merged["map"]: merged["images"]})
    summary["report"] = storage.join(out, CLUSTERS_REPORT)
    html = report.clusters_html(summary, _cluster_views(out, settings, record, vocab))
    storage.write_text(summary["report"], html)
    return summary


def _random_features(out: str, settings: VocabSettings) -> bool:
    """Whether the features are the grid8 extraction's under ``out`` made with random weights."""
    if settings.features:
        return False
    try:
        return extraction_stage("grid8").open(out).settings().weights.startswith("random:")
    except VlprepError:
        return False


def _image_lookup(out: str, settings: VocabSettings) -> dict[str, str]:
    """file stem -> image URI, for the report's crops: the settings' images, else the grid8 extraction's."""
    from vlprep.data.images import list_images

    if settings.images:
        uris = list_images(settings.images)
    else:
        try:
            uris = extraction_stage("grid8").open(out).plan_doc()["items"]
        except VlprepError:
            return {}
    lookup: dict[str, str] = {}
    for uri in uris:
        lookup.setdefault(PurePosixPath(uri).stem, uri)
    return lookup


def _cluster_views(out: str, settings: VocabSettings, record: dict, vocab: clusters.Vocabulary) -> dict:
    """What the report shows: per target the cluster sizes; for the source, the largest clusters' cells."""
    import numpy as np

    from vlprep import parts

    sizes = {name: np.bincount(parts.load_npy(storage.join(out, vocab.cluster_index_file(name)))[:, 0],
                               minlength=vocab.k) for name in record["targets"]}
    lookup = _image_lookup(out, settings)
    mapping = clusters.read_cluster_map(storage.join(out, vocab.cluster_map_file(vocab.src))) \
        if vocab.src in record["targets"] else {}
    top = [int(c) for c in np.argsort(-sizes.get(vocab.src, np.zeros(1)), kind="stable")[:REPORT_CLUSTERS]]
    members: dict[int, list] = {c: [] for c in top}
    for stem, ids in mapping.items():
        if stem not in lookup:
            continue
        for cell, cluster in enumerate(ids.tolist()):
            if cluster in members and len(members[cluster]) < REPORT_CELLS:
                members[cluster].append((lookup[stem], cell))
        if all(len(m) == REPORT_CELLS for m in members.values()):
            break
    return {"sizes": sizes, "members": members, "grid": vocab.grid_size, "images_found": bool(lookup)}
