"""The files users and consumers read: one module per format; :func:`open_h5` opens any of our HDF5s."""

from __future__ import annotations

from vlprep import VlprepError


def open_h5(path, what: str = "HDF5 file", name: str = ""):
    """An HDF5 file opened read-only; a missing, truncated or garbage file is one ``VlprepError`` naming it
    (h5py's own error is an ``OSError`` with a C stack in its text). ``name``: what to call it (a URI whose
    local copy ``path`` is, or the URI of an open file object)."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        why = "no such file" if isinstance(e, FileNotFoundError) else "truncated or not HDF5"
        detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise VlprepError(f"{name or path}: cannot open the {what} ({why}: {detail}); rerun the step that writes it") from None
