"""Image paths as they come from folders and data files: confined to their root, printable, and why one
cannot be read.

- A path taken from a data file (a Karpathy ``filepath``/``filename``, a relative line of a list file) must
  stay under its root: for a local root by ``os.path.normpath`` (no absolute path, no ``..`` past the root),
  for a ``gs://`` / ``s3://`` root by segments (no ``..`` segment, no leading ``/``). :func:`confine` says
  where it lands, or None. Symlinks under a local root are followed: they are the operator's own layout
  (``train2014 -> /mnt/coco/train2014``), not something a data file can plant.
- A local folder is walked without following symlinked folders (as ``Path.rglob`` does); symlinked files,
  dangling links and symlink loops among them are listed, so that reading them fails and says why.
- A file name that is not UTF-8 (``os.walk`` hands it over surrogate-escaped) cannot go into a plan, a
  done-marker or a report. It is listed under its printable name (``x_\\xff\\xfe.jpg``, see :func:`printable`),
  which does not exist; reading it fails and :func:`why_unreadable` names the real file.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re

from vlprep import VlprepError, storage

_ESCAPE = re.compile(rb"\\x([0-9a-f]{2})")


def printable(path: str) -> str:
    """``path`` itself when it is valid UTF-8, else its bytes with the undecodable ones as ``\\xNN``."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def confine(root: str, rel: str) -> str | None:
    """``root/rel`` when ``rel`` is a relative path that stays under ``root``; None when it would leave it."""
    if rel.startswith("/"):
        return None
    if storage.is_remote(root):
        return None if ".." in rel.split("/") else storage.join(root, rel)
    base = os.path.normpath(root)
    joined = os.path.normpath(os.path.join(base, rel))
    inside = joined == base or joined.startswith(base.rstrip(os.sep) + os.sep)
    return joined if inside else None


def walk_local(root: str, exts: tuple[str, ...]) -> list[str]:
    """Printable paths of the files under a local folder (or the file itself) whose names end in ``exts``
    (any case); hidden ``.tmp-`` files (our unfinished writes) are left out. A folder that cannot be
    read stops the listing with an error naming it."""
    if os.path.isfile(root):
        return [printable(root)]

    def refuse(e: OSError):
        raise VlprepError(f"{printable(e.filename or root)}: cannot list this folder ({e.strerror}); "
                          "fix its permissions or leave it out of the image source")

    if not os.path.isdir(root):
        return []
    found = []
    for folder, dirs, files in os.walk(root, onerror=refuse):
        dirs.sort()
        found += [printable(os.path.join(folder, name)) for name in files
                  if name.lower().endswith(exts) and not name.startswith(".tmp-")]
    return found


def why_unreadable(uri: str, err: OSError) -> str:
    """A reason for a report: a symlink loop, a dangling link, a file name that is not UTF-8, or ``err``."""
    if storage.is_remote(uri):
        return str(err)
    if os.path.islink(uri):
        try:
            os.stat(uri)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "symlink loop"
            return f"dangling link to {printable(os.readlink(uri))}"
    if not os.path.lexists(uri):
        raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), uri.encode("utf-8"))
        if raw != uri.encode("utf-8") and os.path.lexists(raw):
            return (f"file name is not valid UTF-8 (bytes {os.path.basename(raw).hex()}): it cannot be named in "
                    "the outputs; rename the file to a UTF-8 name")
    return str(err) if err.errno != errno.ELOOP else "symlink loop"


def relative(filepath: str, filename: str) -> str:
    """A Karpathy entry's path below the image root (``filepath/filename``; an absolute part stays absolute)."""
    return posixpath.join(filepath, filename) if filepath else filename


def few(items: list[str], limit: int = 10) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
