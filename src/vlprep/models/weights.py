"""Weights and vocabularies: resolve a spec to a local file (cached, checksummed) and read it safely.

A spec is one of:

- ``http(s)://host/path[#sha256=<hex>]``: downloaded once into the cache directory
  (``$VLPREP_CACHE``, else ``~/.cache/vlprep``), written to a temp file and renamed. The sha256 of
  every cached file is kept next to it (``<file>.sha256``) and checked before each reuse; with a
  ``#sha256=`` suffix the file must also have that digest.
- ``gs://bucket/key[#sha256=<hex>]`` or ``s3://bucket/key[...]``: copied into the cache the same way, via
  ``vlprep.storage``.
- a local path (``#sha256=`` also allowed): used in place.
- ``random:<seed>``: no file. The caller builds a deterministic random init of the real
  architecture; ``Resolved.is_random`` is True so that logs and reports can say so.
- ``default``: the model's published weights (:data:`PUBLISHED`; ``$VLPREP_WEIGHTS_URL_<MODEL>``
  overrides the address), downloaded once with a 10 s connect timeout and cached like any URL. When
  they cannot be fetched (offline, or none published) it falls back to ``random:0`` with a WARNING
  and ``Resolved.fallback`` saying why; reports and markers then show random weights. A run fixes
  this choice once, at plan time (:func:`pin_default`): the settings record the published URL pinned
  ``#sha256=`` (or ``random:0`` and the reason), so every shard, on any machine, loads the same weights.

No checksum is published for these files: the sha256 and size of the first download are recorded
beside the cached file (``<file>.sha256``) and checked on every later use. A cached file that fails
them is downloaded once more and must then match the record (or the ``#sha256=`` pin, which wins);
otherwise it is refused: the published file changed.

Files ending in ``.gz`` (or starting with the gzip magic) are decompressed transparently when read.

Checkpoints from outside are untrusted: pickles go through :mod:`vlprep.safe_pickle`, which
rebuilds numpy arrays and plain containers and refuses every other global; torch files are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vlprep import VlprepError, safe_pickle

log = logging.getLogger(__name__)

# Published files (PB = airsplay/py-bottom-up-attention README, BUTD = peteanderson80/bottom-up-attention).
# The detectron2 port of the BUTD Visual Genome R-101-C4 attribute model (36-box Caffe model), which
# VOLTA's features_extraction/README puts in ~/.torch/fvcore_cache/models/.
BUTD_VG_ATTR_WEIGHTS = "http://nlp.cs.unc.edu/models/faster_rcnn_from_caffe_attr.pkl"
# The 1600-400-20 Visual Genome vocabularies (BUTD data/genome/1600-400-20/, also in PB).
_VG_VOCAB_BASE = (
    "https://raw.githubusercontent.com/peteanderson80/bottom-up-attention/master/data/genome/1600-400-20/"
)
VG_OBJECTS_VOCAB = _VG_VOCAB_BASE + "objects_vocab.txt"
VG_ATTRIBUTES_VOCAB = _VG_VOCAB_BASE + "attributes_vocab.txt"

# The X-LXMERT / ViLBERT multi-task VG X-152-32x8d-FPN detector (vqa-maskrcnn-benchmark format).
X152_VG_WEIGHTS = "https://dl.fbaipublicfiles.com/vilbert-multi-task/detectron_model.pth"
# "default" per model: None where nothing is published (Maria's matcher is trained by the user)
PUBLISHED = {"butd": BUTD_VG_ATTR_WEIGHTS, "x152": X152_VG_WEIGHTS, "matcher": None}
DEFAULT = "default"
URL_ENV = "VLPREP_WEIGHTS_URL_{}"  # e.g. VLPREP_WEIGHTS_URL_BUTD: a mirror of the published file
FALLBACK = "random:0"
CONNECT_TIMEOUT = 10  # seconds: an unreachable default falls back quickly
DOWNLOAD_TIMEOUT = 60

CACHE_ENV = "VLPREP_CACHE"
_BLOCK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Resolved:
    """A resolved spec: a local file, or a random init (``path`` None, ``is_random`` True)."""

    spec: str
    path: Path | None
    is_random: bool = False
    seed: int | None = None
    sha256: str | None = None  # digest of ``path`` when it was computed (downloads, #sha256= specs)
    fallback: str = ""  # why ``default`` fell back to random weights ("" when it did not)

    def describe(self) -> str:
        if self.fallback:
            return f"{DEFAULT} -> {FALLBACK} (RANDOM weights: {self.fallback})"
        if self.is_random:
            return f"{self.spec} (RANDOM weights, seed {self.seed}: not a trained model)"
        return f"{self.spec} -> {self.path}" + (f" (sha256 {self.sha256})" if self.sha256 else "")


def default_cache_dir() -> Path:
    """``$VLPREP_CACHE`` if set, else ``~/.cache/vlprep``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlprep"


def parse_random_spec(spec: str) -> int | None:
    """The seed of a ``random:<seed>`` spec, or None for any other spec."""
    if not str(spec).startswith("random:"):
        return None
    text = str(spec)[len("random:") :]
    try:
        return int(text)
    except ValueError:
        raise VlprepError(f"{spec!r}: a random spec is random:<integer seed>, e.g. random:0") from None


def split_checksum(spec: str) -> tuple[str, str | None]:
    """Split ``location#sha256=<hex>`` into (location, hex or None)."""
    spec = str(spec)
    location, sep, fragment = spec.partition("#")
    if not sep:
        return spec, None
    key, _, value = fragment.partition("=")
    value = value.strip().lower()
    if key != "sha256" or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise VlprepError(f"{spec!r}: the only supported suffix is #sha256=<64 hex digits>")
    return location, value


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def check_spec(spec: str | Path, what: str = "weights") -> None:
    """Refuse a spec that cannot resolve, without downloading: a bad ``random:`` seed or checksum suffix,
    a URL without a host or bucket, a local file that does not exist (run at plan time)."""
    spec = str(spec)
    if spec == DEFAULT or parse_random_spec(spec) is not None:
        return
    location, _ = split_checksum(spec)
    scheme, sep, rest = location.partition("://")
    if sep and scheme in ("http", "https", "gs", "s3"):
        if not rest.split("/", 1)[0] or rest.endswith("/"):
            raise VlprepError(f"{what} {spec!r}: the URL names no {'bucket' if scheme in ('gs', 's3') else 'host'} "
                              "or no file; give e.g. gs://bucket/path/file.pth")
        return
    if sep or location.startswith(("gs:", "s3:", "http:", "https:")):
        raise VlprepError(f"{what} {spec!r}: not a URL this project reads (http(s)://, gs://, s3://) nor a local file")
    if not Path(location).expanduser().is_file():
        raise VlprepError(f"{what} {location}: file not found; give an existing file, a URL, or random:<seed>")


class Unreachable(VlprepError):
    """A download that could not be made (network, HTTP error): ``default`` falls back on it."""


def url_env(model: str) -> str:
    """The variable that overrides ``model``'s published address (``clip-ViT-B-32`` -> ``..._CLIP_VIT_B_32``)."""
    return URL_ENV.format(re.sub(r"[^A-Z0-9]", "_", model.upper()))


def published_url(model: str, published: str | None = None) -> str | None:
    """The address ``default`` downloads for ``model``: ``$VLPREP_WEIGHTS_URL_<MODEL>``, else :data:`PUBLISHED`
    (``published`` gives it for models outside that table, e.g. CLIP architectures)."""
    if model not in PUBLISHED and published is None:
        raise VlprepError(f"no default weights for model {model!r}; models: {', '.join(PUBLISHED)}")
    return os.environ.get(url_env(model)) or (PUBLISHED[model] if model in PUBLISHED else published)


def random_fallback(model: str, reason: str) -> Resolved:
    """``random:0`` in place of ``model``'s published weights, with a WARNING that cannot be missed."""
    log.warning("%s\n!!! %s: published weights unavailable (%s).\n!!! Using RANDOM weights (%s): features are "
                "NOT meaningful. Pass --weights <file or URL> for real features.\n%s",
                "!" * 78, model, reason, FALLBACK, "!" * 78)
    return Resolved(spec=FALLBACK, path=None, is_random=True, seed=parse_random_spec(FALLBACK), fallback=reason)


def resolve_default(model: str, *, cache_dir: str | Path | None = None, published: str | None = None) -> Resolved:
    """``model``'s published weights, cached (``spec``: the URL pinned ``#sha256=``); :func:`random_fallback`
    when they cannot be downloaded."""
    url = published_url(model, published)
    if not url:
        return random_fallback(model, "none are published")
    try:
        path, digest = _cached_copy(url, None, Path(cache_dir) if cache_dir else default_cache_dir(),
                                    timeout=CONNECT_TIMEOUT)
    except Unreachable as e:
        return random_fallback(model, str(e))
    return Resolved(spec=f"{url}#sha256={digest}", path=path, sha256=digest)


def pin_default(spec: str, model: str, *, unfit: str = "", published: str | None = None,
                cache_dir: str | Path | None = None) -> tuple[str, str]:
    """(concrete spec, fallback reason) for a plan step to record, so that every shard loads the same weights.

    ``default`` becomes the published URL pinned ``#sha256=`` (downloaded into the cache now), or
    ``random:0`` with the reason (flagged loudly) when it cannot be fetched, or when ``unfit`` says why
    the published weights do not fit the configured architecture. Any other spec comes back as given, "".
    """
    spec = str(spec)
    if spec != DEFAULT:
        return spec, ""
    resolved = (random_fallback(model, unfit) if unfit else
                resolve_default(model, cache_dir=cache_dir, published=published))
    return resolved.spec, resolved.fallback


def resolve(spec: str | Path, *, cache_dir: str | Path | None = None, model: str | None = None) -> Resolved:
    """Resolve a weights or vocabulary spec (see the module docstring) to a local file; ``model`` names
    whose published weights ``default`` stands for."""
    spec = str(spec)
    if spec == DEFAULT:
        if model is None:
            raise VlprepError("'default' weights need a model; pass a file, URL or random:<seed> here")
        return resolve_default(model, cache_dir=cache_dir)
    seed = parse_random_spec(spec)
    if seed is not None:
        return Resolved(spec=spec, path=None, is_random=True, seed=seed)
    location, expected = split_checksum(spec)
    if location.startswith(("http://", "https://", "gs://", "s3://")):
        path, digest = _cached_copy(location, expected, Path(cache_dir) if cache_dir else default_cache_dir())
        return Resolved(spec=spec, path=path, sha256=digest)
    path = Path(location).expanduser()
    if not path.is_file():
        raise VlprepError(
            f"{path}: file not found. Pass an existing local path, an http(s)://, gs:// or s3:// URL "
            "(downloaded once and cached), or random:<seed> for random weights (tests and demos only)."
        )
    digest = None
    if expected:
        digest = file_sha256(path)
        if digest != expected:
            raise VlprepError(
                f"{path}: sha256 is {digest}, expected {expected}; the file is not the one named"
            )
    return Resolved(spec=spec, path=path, sha256=digest)


def _cache_path(location: str, cache_dir: Path) -> Path:
    name = location.rstrip("/").rsplit("/", 1)[-1] or "download"
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    return cache_dir / "weights" / f"{key}-{name}"


def _recorded(sidecar: Path) -> tuple[str | None, int | None]:
    """(sha256, size) recorded at the first download (older records hold only the digest)."""
    if not sidecar.is_file():
        return None, None
    fields = sidecar.read_text().split()
    return (fields[0] if fields else None), (int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None)


def _cached_copy(location: str, expected: str | None, cache_dir: Path, *,
                 timeout: float = DOWNLOAD_TIMEOUT) -> tuple[Path, str]:
    """The cached copy of a URL, downloaded if absent; one that fails its record is downloaded once
    more, and the new copy must match the record (a ``#sha256=`` pin wins over it)."""
    target = _cache_path(location, cache_dir)
    sidecar = target.with_name(target.name + ".sha256")
    recorded, size = _recorded(sidecar)
    if target.is_file() and recorded:
        digest = file_sha256(target) if size in (None, target.stat().st_size) else None
        if digest == recorded and (expected is None or digest == expected):
            return target, digest
        log.warning("cached %s for %s fails its checksum; downloading again", target, location)
    digest = _download(location, target, expected or recorded, timeout, pinned=bool(expected))
    sidecar.write_text(f"{digest} {target.stat().st_size}\n")
    log.info("downloaded %s -> %s (sha256 %s)", location, target, digest)
    return target, digest


def _download(location: str, target: Path, expected: str | None, timeout: float, *, pinned: bool) -> str:
    """Download ``location`` to a temp file beside ``target``; publish it only when it has ``expected``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix="-" + target.name)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, _open_remote(location, timeout) as src:
            try:
                for block in iter(lambda: src.read(_BLOCK), b""):
                    h.update(block)
                    out.write(block)
            except (TimeoutError, ConnectionError) as e:  # stalled or cut mid-way
                raise Unreachable(f"{location}: download interrupted ({e}); run again, or pass a local copy") from None
        digest = h.hexdigest()
        if expected is not None and digest != expected:
            fix = ("fix the #sha256= suffix or the URL" if pinned else
                   f"it differs from the first download recorded in {target}.sha256: delete that file to accept the "
                   "new one, or pin the digest you trust with #sha256=")
            raise VlprepError(f"{location}: downloaded file has sha256 {digest}, expected {expected}. The file at that "
                              f"address changed or is corrupt: {fix}.")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def _open_remote(location: str, timeout: float = DOWNLOAD_TIMEOUT) -> BinaryIO:
    if location.startswith(("gs://", "s3://")):
        from vlprep import storage

        try:
            return storage.open_read(location)
        except FileNotFoundError as e:
            raise VlprepError(f"{location}: not found ({e}); check the path") from None
    try:
        return urllib.request.urlopen(location, timeout=timeout)
    except (urllib.error.URLError, OSError) as e:
        raise Unreachable(
            f"{location}: download failed ({e}). Download the file by other means and pass its local "
            "path (or a gs:// copy) instead."
        ) from None


# ---------------------------------------------------------------- reading files


def open_maybe_gzip(path: str | Path) -> BinaryIO:
    """Open a file for reading, decompressing it if it is gzip (by magic number)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def load_pickle(path: str | Path) -> Any:
    """Unpickle a (possibly gzipped) weights file; only numpy data and plain containers are rebuilt."""
    return safe_pickle.load_file(path)


# torch.save's zip container, and its legacy format (a pickled magic number first).
_TORCH_ZIP = b"PK\x03\x04"
_TORCH_LEGACY = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _is_torch_file(path: Path) -> bool:
    with open_maybe_gzip(path) as f:
        head = f.read(len(_TORCH_LEGACY))
    return head.startswith(_TORCH_ZIP) or head == _TORCH_LEGACY


def _refusal(e: Exception) -> str:
    """What torch refused (e.g. "unsupported GLOBAL posix.system"), without its advice to load the file
    with ``weights_only=False``, which would run whatever the file holds."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    kept = [x for x in lines if "weights_only" not in x and "Weights only load failed" not in x]
    return (kept[0] if kept else type(e).__name__).rstrip(".")


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray | Any], str]:
    """Read a checkpoint file into (name -> array or tensor, layout).

    Layouts: ``"d2"`` (pickle ``{"model": {...}, "__author__": ...}``, detectron2 zoo format),
    ``"blobs"`` (pickle ``{"blobs": {...}}``, Caffe2/Detectron; ``*_momentum`` entries dropped),
    ``"plain"`` (a bare name -> array pickle) and ``"torch"`` (``torch.save`` of a state dict, or of
    ``{"model": state_dict}``), read with ``weights_only=True``.
    """
    path = Path(path)
    if _is_torch_file(path):
        import torch

        with open_maybe_gzip(path) as f:
            try:
                data = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise VlprepError(f"{path}: refused by torch.load(weights_only=True): {_refusal(e)}. This file "
                                  "may only hold tensors and plain containers; do not load it by other means "
                                  "unless you trust where it came from") from None
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            data = data["model"]
        return _check_mapping(data, path), "torch"
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise VlprepError(f"{path}: expected a dict of arrays, got {type(data).__name__}")
    if "model" in data and "__author__" in data:
        return _check_mapping(data["model"], path), "d2"
    if "blobs" in data:
        blobs = {k: v for k, v in data["blobs"].items() if not str(k).endswith("_momentum")}
        return _check_mapping(blobs, path), "blobs"
    return _check_mapping({k: v for k, v in data.items() if not str(k).endswith("_momentum")}, path), "plain"


def _check_mapping(data: Any, path: Path) -> dict:
    if not isinstance(data, dict) or not data:
        raise VlprepError(f"{path}: no name -> array mapping found in the checkpoint")
    return dict(data)


# ---------------------------------------------------------------- vocabularies


def load_vocab(
    spec: str | Path, *, size: int, placeholder: str, cache_dir: str | Path | None = None
) -> list[str]:
    """Labels of a vocabulary file, one per line; a line may list synonyms ``a,b,c`` (the label is ``a``).

    ``random:<seed>`` gives placeholder labels ``f"{placeholder}_{i}"``. The file must have ``size``
    non-empty lines.
    """
    resolved = resolve(spec, cache_dir=cache_dir)
    if resolved.is_random:
        return [f"{placeholder}_{i}" for i in range(size)]
    with open_maybe_gzip(resolved.path) as f:
        text = f.read().decode("utf-8")
    labels = [line.split(",")[0].strip() for line in text.splitlines() if line.strip()]
    if len(labels) != size:
        raise VlprepError(
            f"{resolved.path}: {len(labels)} labels, expected {size}; is it the right vocabulary?"
        )
    return labels


def load_vg_objects(spec: str | Path = VG_OBJECTS_VOCAB, *, cache_dir: str | Path | None = None) -> list[str]:
    """The 1600 Visual Genome object labels (index = ``obj_ids``)."""
    return load_vocab(spec, size=1600, placeholder="object", cache_dir=cache_dir)


def load_vg_attributes(
    spec: str | Path = VG_ATTRIBUTES_VOCAB, *, cache_dir: str | Path | None = None
) -> list[str]:
    """The 400 Visual Genome attribute labels (index = ``attr_ids``)."""
    return load_vocab(spec, size=400, placeholder="attribute", cache_dir=cache_dir)
