"""Progress of long loops: a bar on a terminal, one line per interval in logs.

On a terminal (the stream is a tty) ``Progress`` redraws one line in place: count/total, rate and ETA.
Anywhere else (a pod's log, a file, a pipe) it writes a whole line when the loop starts, then at most one
per interval (``VLPREP_PROGRESS_INTERVAL`` seconds, default 30), and one at the end; never a carriage
return. Use it as a context manager around the loop and call ``advance(n)`` after each step::

    with Progress("regions shard 0", total=len(items), unit="img") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch), failed=len(batch_failed))
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from vlprep import VlprepError

INTERVAL_ENV = "VLPREP_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0
BAR_WIDTH = 24
REDRAW_SECONDS = 0.2  # a terminal bar is redrawn at most this often


def interval_from_env() -> float:
    """Seconds between log lines: ``VLPREP_PROGRESS_INTERVAL`` or 30."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise VlprepError(f"{INTERVAL_ENV}={text!r}: write a number of seconds >= 0 (e.g. 30)")
    return value


def duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Count the steps of one loop and show them (see the module doc). ``stream`` defaults to stderr,
    ``clock`` to ``time.monotonic``, ``interval`` to ``interval_from_env()``."""

    def __init__(self, label: str, *, total: int | None = None, unit: str = "items", stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, interval: float | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.interval = interval_from_env() if interval is None else interval
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.count, self.failed = 0, 0
        self.started = clock()
        self._shown_count = -1
        self._show(self.started)  # the loop has started: a line even if its first step takes long

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, n: int = 1, *, failed: int = 0) -> None:
        """``n`` more steps done (``failed`` of them failed)."""
        self.count += n
        self.failed += failed
        now = self.clock()
        if now - self._shown_at >= (REDRAW_SECONDS if self.tty else self.interval):
            self._show(now)

    def close(self) -> None:
        """Show the final count, unless the last line did (a terminal bar ends its line)."""
        if self.count != self._shown_count:
            self._show(self.clock())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def status(self, now: float) -> str:
        """``12/100 img (12%), 3.40 img/s, ETA 0:26, 1 failed`` at clock time ``now``."""
        elapsed = max(now - self.started, 1e-9)
        rate = self.count / elapsed
        text = f"{self.count}/{self.total}" if self.total is not None else f"{self.count}"
        text += f" {self.unit}"
        if self.total:
            text += f" ({100 * self.count / self.total:.0f}%)"
        if self.count == 0 and now == self.started:
            return text + ", starting"
        text += f", {rate:.2f} {self.unit}/s"
        if self.total is not None and self.count < self.total:
            text += f", ETA {duration((self.total - self.count) / rate)}" if rate > 0 else ", ETA ?"
        else:
            text += f", took {duration(elapsed)}"
        return text + (f", {self.failed} failed" if self.failed else "")

    def _show(self, now: float) -> None:
        self._shown_at, self._shown_count = now, self.count
        if self.tty:
            self.stream.write(f"\r{self.label} {self._bar()} {self.status(now)}\x1b[K")
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self.stream.write(f"{stamp} progress {self.label}: {self.status(now)}\n")
        self.stream.flush()

    def _bar(self) -> str:
        if not self.total:
            return ""
        filled = min(BAR_WIDTH, BAR_WIDTH * self.count // self.total)
        return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"
