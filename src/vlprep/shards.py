"""The shard protocol every fanned-out stage follows (``vlprep.stage`` wraps it for a stage).

1. ``plan`` sorts the items once, splits them into N contiguous shards and writes the plan to
   ``{root}/plan.json`` with a *fingerprint* of the settings the shards are computed with. It returns
   small shard specs (index, count, plan URI) — what a KFP ParallelFor iterates over; the item lists
   themselves stay in the store.
2. A shard writes its parts under ``{root}/shard-IIIII-of-NNNNN/`` (hashed as they are written) and
   then, last, a done-marker ``{root}/shard-IIIII-of-NNNNN.done.json`` (item count, fingerprint, bytes
   and sha256 of every part, versions, failed items). ``run_shard`` skips a shard whose marker verifies
   (parts re-hashed) and redoes any other, removing its stale marker first.
3. ``collect`` (the merge step) reads the plan once and refuses to go on if a shard's marker is
   missing, belongs to other items or settings, or does not match its parts' sizes; it names the shard.
   Part contents are trusted to the marker (they were hashed when written), so a merge reads each
   part once.

Shards are contiguous ranges of the sorted list, so concatenating parts in shard order gives the
same bytes whatever N is.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vlprep import VlprepError, __version__, storage

SPLITS = ("balanced", "group")


def split_bounds(total: int, num_shards: int, split: str = "balanced") -> list[tuple[int, int]]:
    """[start, end) of each shard.

    ``balanced``: sizes differ by at most one.
    ``group``: upstream's ``--group_id/--total_group`` split as it ran under Python 2
    (``per_num = total // total_group``; group g gets ``[g*per_num, (g+1)*per_num)`` and the last
    group everything to the end).
    """
    if num_shards < 1:
        raise VlprepError(f"num_shards must be >= 1 (got {num_shards})")
    if split == "balanced":
        base, extra = divmod(total, num_shards)
        bounds, start = [], 0
        for i in range(num_shards):
            end = start + base + (1 if i < extra else 0)
            bounds.append((start, end))
            start = end
        return bounds
    if split == "group":
        per = total // num_shards
        return [(g * per, total if g == num_shards - 1 else (g + 1) * per) for g in range(num_shards)]
    raise VlprepError(f"unknown shard split {split!r}; use one of {', '.join(SPLITS)}")


def _digest(items: Sequence) -> str:
    return hashlib.sha256(json.dumps(list(items), ensure_ascii=False).encode()).hexdigest()


def versions() -> dict:
    """Versions of the packages that shape outputs (read from metadata, nothing imported)."""
    from importlib import metadata

    out = {"vlprep": __version__, "python": platform.python_version()}
    for dist in ("numpy", "torch", "torchvision", "open_clip_torch", "faiss-cpu", "faiss-gpu", "h5py", "lmdb", "kfp"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def plan(items: Sequence, num_shards: int, root: str, split: str = "balanced", sort: bool = True,
         fingerprint: str = "") -> list[dict]:
    """Write ``{root}/plan.json`` and return one spec per shard: ``{"index", "count", "plan"}``.

    ``fingerprint`` names what the shards are computed with (settings, upstream results): a marker
    made under another fingerprint is never taken for done.
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise VlprepError(f"{root}: {num_shards!r} shards; give 1 or more")
    items = sorted(items) if sort else list(items)
    if len(set(map(str, items))) != len(items):
        raise VlprepError(f"{root}: the item list has duplicates; each item must appear once")
    num_shards = max(1, min(num_shards, len(items))) if items else 1
    bounds = split_bounds(len(items), num_shards, split)
    doc = {
        "items": items,
        "bounds": bounds,
        "split": split,
        "fingerprint": fingerprint,
        "shards": [_digest(items[s:e]) for s, e in bounds],
    }
    uri = storage.join(root, "plan.json")
    storage.write_text(uri, json.dumps(doc, ensure_ascii=False))
    return [{"index": i, "count": num_shards, "plan": uri} for i in range(num_shards)]


@dataclass
class Shard:
    index: int
    count: int
    items: list
    digest: str
    root: str
    fingerprint: str = ""
    written: dict = field(default_factory=dict)  # part name -> {"name", "bytes", "sha256"} hashed on write

    @property
    def tag(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def part(self, name: str) -> str:
        """URI of one of this shard's output parts."""
        return storage.join(self.root, self.tag, name)

    @property
    def marker(self) -> str:
        return storage.join(self.root, f"{self.tag}.done.json")

    def write_part(self, name: str, data: bytes) -> None:
        """Write a part (atomically) and record its size and sha256 for the marker."""
        storage.write_bytes(self.part(name), data)
        self.written[name] = {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def save_array(self, name: str, array) -> None:
        """A ``.npy`` part (no pickles)."""
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        self.write_part(name, buf.getvalue())

    def write_jsonl(self, name: str, rows: Sequence[dict]) -> None:
        """A JSON-lines part, one object per line."""
        self.write_part(name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def _read_plan(uri: str) -> dict:
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise VlprepError(f"{uri}: shard plan missing; run the plan step first") from None


def _shard(doc: dict, uri: str, index: int, count: int) -> Shard:
    if len(doc["bounds"]) != count or not 0 <= index < count:
        raise VlprepError(f"{uri}: shard {index} of {count} does not match the plan ({len(doc['bounds'])} shards)")
    s, e = doc["bounds"][index]
    return Shard(index, count, doc["items"][s:e], doc["shards"][index], storage.parent(uri), doc.get("fingerprint", ""))


def load(spec: dict) -> Shard:
    """The shard a spec (from ``plan``) names, with its items."""
    index, count = int(spec["index"]), int(spec["count"])  # KFP may hand ints over as floats
    return _shard(_read_plan(spec["plan"]), spec["plan"], index, count)


def verify(shard: Shard, deep: bool = True) -> dict | None:
    """The shard's marker if it exists and matches the plan, the fingerprint and every part; otherwise None.

    ``deep`` re-hashes every part (before skipping work); otherwise sizes are checked and contents
    trusted to the marker, whose hashes were taken as the parts were written.
    """
    try:
        marker = json.loads(storage.read_text(shard.marker))
    except (FileNotFoundError, ValueError):  # missing, not JSON, not UTF-8
        return None
    if not _well_formed(marker):
        return None  # a marker of another shape (cut, edited, another version) is not done: redo the shard
    if (marker.get("digest") != shard.digest or marker.get("items") != len(shard.items)
            or marker.get("fingerprint", "") != shard.fingerprint):
        return None
    for part in marker.get("parts", []):
        uri = shard.part(part["name"])
        if not storage.exists(uri) or storage.size(uri) != part["bytes"]:
            return None
        if deep and storage.sha256(uri) != part["sha256"]:
            return None
    return marker


_PART_FIELDS = {"name": str, "bytes": int, "sha256": str}


def _well_formed(marker) -> bool:
    """A dict whose ``parts`` are ``{"name", "bytes", "sha256"}`` (name a path inside the shard folder) and whose
    ``failed`` is a list: what :func:`verify`, ``collect`` and the merges read from it."""
    if not isinstance(marker, dict) or not isinstance(marker.get("parts", []), list):
        return False
    if not isinstance(marker.get("failed", []), list):
        return False
    for part in marker.get("parts", []):
        if not isinstance(part, dict) or any(not isinstance(part.get(k), t) for k, t in _PART_FIELDS.items()):
            return False
        if not part["name"] or part["name"].startswith("/") or ".." in part["name"].split("/"):
            return False
    return True


def run_shard(spec: dict, work: Callable[[Shard], dict], stage: str, params: dict | None = None) -> dict:
    """Run ``work(shard)`` unless the shard is already done; then write its marker, last.

    ``work`` writes its parts with ``shard.write_part`` / ``save_array`` / ``write_jsonl`` (or to
    ``shard.part(name)`` directly) and returns
    ``{"parts": [name, ...], "failed": [{"item": ..., "error": ...}], **stats}``.
    """
    shard = load(spec)
    done = verify(shard)
    if done is not None:
        return {**done, "skipped": True}
    storage.delete(shard.marker)  # a stale marker must never stand beside new parts
    t0 = time.time()
    result = dict(work(shard))
    parts = []
    for name in result.pop("parts"):
        if name in shard.written:
            parts.append(shard.written[name])
        else:
            uri = shard.part(name)
            parts.append({"name": name, "bytes": storage.size(uri), "sha256": storage.sha256(uri)})
    marker = {
        "stage": stage,
        "shard": shard.index,
        "count": shard.count,
        "items": len(shard.items),
        "digest": shard.digest,
        "fingerprint": shard.fingerprint,
        "parts": parts,
        "failed": result.pop("failed", []),
        "params": params or {},
        "versions": versions(),
        "seconds": round(time.time() - t0, 3),
        **result,
    }
    storage.write_text(shard.marker, json.dumps(marker, indent=1, ensure_ascii=False))
    return {**marker, "skipped": False}


def collect(plan_uri: str) -> list[tuple[Shard, dict]]:
    """Every shard of a plan with its verified marker, in shard order (the plan is read once).

    Raises naming the first shard that is missing or inconsistent: the merge must not run.
    """
    doc = _read_plan(plan_uri)
    count = len(doc["bounds"])
    out = []
    for i in range(count):
        shard = _shard(doc, plan_uri, i, count)
        marker = verify(shard, deep=False)
        if marker is None:
            why = "has no done-marker" if not storage.exists(shard.marker) else "does not match its marker or the plan"
            raise VlprepError(
                f"{shard.marker}: shard {i} of {count} {why}; rerun the extraction step (done shards are skipped)"
            )
        out.append((shard, marker))
    return out


def plan_doc(plan_uri: str) -> dict:
    """The plan document (items, bounds, split, fingerprint)."""
    return _read_plan(plan_uri)
