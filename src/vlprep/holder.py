"""Who holds a stage's output: ``_work/<stage>/holder.json``, written by the plan step.

The record names the run (a random id), its host, pid and start time, and the fingerprint of the
settings it plans with. A plan with other settings while another run still holds the output stops with
one error naming that run; a plan with the same settings shares it (two identical runs produce the same
bytes). A holder is live while its process exists (same host) or, seen from another host or through an
object store, while its lease is fresh: every finished shard of that run refreshes it.

Shard steps and the merge check the record again (``check_current``): when another run with other
settings took the output over meanwhile, their work is refused instead of being published under the
wrong settings.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from vlprep import VlprepError, storage
from vlprep.storage.local import pid_alive

LEASE_S = 600  # a holder on another host counts as live this long after its last refresh
HOST = socket.gethostname()


def read(uri: str) -> dict | None:
    """The holder record, or None when there is none (or it is unreadable: a new plan replaces it)."""
    try:
        doc = json.loads(storage.read_text(uri))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def is_live(doc: dict) -> bool:
    """Whether the run a record names may still be writing (never this process's own earlier plan)."""
    if doc.get("host") == HOST:
        pid = doc.get("pid")
        return isinstance(pid, int) and pid != os.getpid() and pid_alive(pid)
    refreshed = doc.get("refreshed", 0)
    return isinstance(refreshed, int | float) and time.time() - refreshed < LEASE_S


def describe(doc: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc.get("started", 0)))
    return f"run {doc.get('run')} (pid {doc.get('pid')} on host {doc.get('host')} since {since})"


def claim(uri: str, fingerprint: str, out: str) -> str:
    """Take the output for a new run with settings ``fingerprint``; returns the run id.

    Refuses when a live run holds it with other settings."""
    held = read(uri)
    if held and held.get("fingerprint") != fingerprint and is_live(held):
        raise VlprepError(f"{out}: held by {describe(held)} with other settings; "
                          f"wait for it or use another --out")
    now = time.time()
    run = uuid.uuid4().hex[:12]
    doc = {"run": run, "host": HOST, "pid": os.getpid(), "started": now, "refreshed": now, "fingerprint": fingerprint}
    storage.write_text(uri, json.dumps(doc, indent=1))
    return run


def check_current(uri: str, run: str, fingerprint: str, what: str) -> None:
    """Refuse ``what`` (a shard, a merge) of ``run`` when another run with other settings holds the
    output now: its plan and settings replaced this run's."""
    held = read(uri)
    if held and held.get("run") != run and held.get("fingerprint") != fingerprint:
        raise VlprepError(f"{what}: the output was taken over by {describe(held)} with other settings while "
                          f"this run was working; nothing published; rerun when it is done, or use another --out")


def refresh(uri: str, run: str) -> None:
    """Renew ``run``'s lease (after each of its shards); nothing when another run holds the output."""
    held = read(uri)
    if held and held.get("run") == run:
        storage.write_text(uri, json.dumps({**held, "refreshed": time.time()}, indent=1))
