"""Telling local paths from object-store URIs (``gs://BUCKET/key``, ``s3://BUCKET/key``), and taking URIs apart.

A string that only looks like a URI (``gs:/b``, ``s3://``, ``GS://b``) is an error, never a local path: a
typo must not turn into a local folder named ``gs:``.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlprep import VlprepError

# bucket names as each service accepts them (GCS: 3-222 with dots; S3 and MinIO: 3-63)
_BUCKET = {
    "gs": re.compile(r"[a-z0-9]([a-z0-9._-]{0,220}[a-z0-9])?"),
    "s3": re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"),
}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def scheme(uri: str) -> str | None:
    """``"gs"`` or ``"s3"`` for an object-store URI, None for a local path; a malformed URI is an error."""
    uri = str(uri)
    for name, rule in _BUCKET.items():
        if uri.startswith(f"{name}://"):
            bucket = uri[len(name) + 3:].split("/", 1)[0]
            if not rule.fullmatch(bucket):
                raise VlprepError(f"{uri}: not a valid {name}:// URI (bucket {bucket!r}); write {name}://BUCKET/path")
            return name
    found = _SCHEME.match(uri)
    if found:
        raise VlprepError(
            f"{uri}: {found.group(0)!r} looks like a URI scheme, but only gs://BUCKET/path, s3://BUCKET/path and "
            "local paths are supported; fix the URI (e.g. gs:/b -> gs://b), or write ./" + uri
            + " for a local file of that name"
        )
    return None


def split(uri: str) -> tuple[str, str]:
    """(bucket, key) of a valid object-store URI; the key has no trailing slash."""
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key.rstrip("/")


def under(key: str, prefix: str) -> bool:
    """Whether object ``key`` is ``prefix`` itself or lies below it, as a file lies in a folder
    (``a/b`` is under ``a``; ``ab/c`` is not). Every key is under the empty prefix (the bucket)."""
    return not prefix or key == prefix or key.startswith(prefix + "/")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an object-store URI."""
    base = str(base)
    if scheme(base):
        return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts if p])
    return str(Path(base, *parts))


def parent(uri: str) -> str:
    """The directory or prefix holding ``uri``."""
    uri = str(uri)
    return uri.rstrip("/").rsplit("/", 1)[0] if scheme(uri) else str(Path(uri).parent)
