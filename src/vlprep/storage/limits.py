"""How much one request moves and how long a storage call may take before it ends in one clear error.

``VLPREP_STORAGE_DEADLINE`` (seconds, default 60) bounds one storage call (a read, a chunk of an upload, a
listing page) including its retries: a store that is down, answers 5xx or accepts connections and never
answers ends in one :class:`VlprepError` within about that long, not in a traceback minutes later. A
request may wait a sixth of it for the store; retries back off exponentially in between, and a new
attempt starts only while it can end before the deadline.
"""

from __future__ import annotations

import os

from vlprep import VlprepError

CHUNK = 8 * 1024 * 1024  # read/write block, GCS resumable chunk and S3 multipart part (a multiple of 256 KiB, >= 5 MiB)
DEFAULT_DEADLINE = 60.0
ATTEMPTS = 6  # an attempt may take deadline / ATTEMPTS


def deadline() -> float:
    """Seconds one storage call may take, retries included (``VLPREP_STORAGE_DEADLINE``)."""
    text = os.environ.get("VLPREP_STORAGE_DEADLINE", "").strip()
    if not text:
        return DEFAULT_DEADLINE
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise VlprepError(f"VLPREP_STORAGE_DEADLINE={text!r}: write a positive number of seconds (default 60)")
    return value


def attempt_timeout() -> float:
    """Seconds one request may wait for the store to connect or to send the next bytes."""
    return max(1.0, deadline() / ATTEMPTS)


def cause(exc: BaseException) -> str:
    """One line naming an exception: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def unreachable(uri: str, exc: BaseException) -> VlprepError:
    """The one error a store that stays down, keeps failing or never answers ends in."""
    return VlprepError(
        f"{uri}: the storage service is unavailable (gave up after retrying with backoff within the "
        f"{deadline():g} s storage deadline; last error {cause(exc)}); check that the endpoint is up and "
        "reachable, then rerun (finished shards are kept), or raise VLPREP_STORAGE_DEADLINE"
    )
