"""A quiet local run: kfp.local's output goes to a log file, the terminal gets one line per task.

kfp.local (the SubprocessRunner) writes everything to ``sys.stdout``: its own messages through a
``logging.StreamHandler(sys.stdout)`` it installs for each task, and each task's executor output
through ``print``. Both happen in the thread that runs the task (fan-outs run tasks on a thread pool),
so ``TaskLog``, standing in for ``sys.stdout`` during the run, attributes every line to the task its
thread is running, writes it to the log file prefixed with the task's name, and keeps the last lines
of each task for the failure report. From kfp.local's task lines (``Executing task 'NAME'``, ``Task
'NAME' finished with status SUCCESS``, a horizontal rule at the task's end) it prints
``  NAME  ok  12.3 s`` to the terminal: ``FAILED`` for a failure, ``cached`` when each of the task's
outputs says its work was already done (a shard whose verified marker was found).
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

TAIL_LINES = 40
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (SUCCESS|FAILURE)")
_RULE = re.compile(r"^\s*-{20,}\s*$")
_RETRY = re.compile(r"Task (\S+) failed \(attempt (\d+)/(\d+)\)\. Retrying in ([\d.]+)s")
_ALREADY_DONE = "'skipped': True"


@dataclass
class Task:
    """One execution of a task (a fan-out runs a task name once per item)."""

    name: str
    started: float
    status: str = ""
    already_done: bool = False
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))

    def summary(self, now: float) -> str:
        word = {"SUCCESS": "cached" if self.already_done else "ok", "FAILURE": "FAILED"}.get(self.status, "?")
        return f"  {self.name:<32} {word:<7} {now - self.started:7.1f} s"


class TaskLog(io.TextIOBase):
    """``sys.stdout`` for a kfp.local run: see the module doc. ``terminal`` gets the task lines."""

    def __init__(self, log: TextIO, terminal: TextIO, clock: Callable[[], float] = time.monotonic):
        self.log, self.terminal, self.clock = log, terminal, clock
        self.failed: dict[str, Task] = {}  # a task's last failed attempt
        self.finished: list[Task] = []
        self._running: dict[int, Task] = {}
        self._partial: dict[int, str] = collections.defaultdict(str)
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        thread = threading.get_ident()
        with self._lock:
            lines = (self._partial.pop(thread, "") + text).split("\n")
            if lines[-1]:
                self._partial[thread] = lines[-1]
            for line in lines[:-1]:
                self._line(thread, _ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def _line(self, thread: int, line: str) -> None:
        started = _STARTED.search(line)
        if started:
            self._running[thread] = Task(started.group(1), self.clock())
        task = self._running.get(thread)
        self.log.write(f"[{task.name}] {line}\n" if task else line + "\n")
        if task is None:
            retry = _RETRY.search(line)
            if retry:
                name, attempt, attempts, delay = retry.groups()
                self._say(f"  {name:<32} retry {int(attempt) + 1}/{attempts} in {float(delay):g} s")
            return
        task.tail.append(line)
        finished = _FINISHED.search(line)
        if finished and finished.group(1) == task.name:
            task.status = finished.group(2)
        elif task.status and _ALREADY_DONE in line:
            task.already_done = True
        elif task.status and _RULE.match(line):  # kfp.local's rule after a task's last message
            self._end(thread)

    def _end(self, thread: int) -> None:
        task = self._running.pop(thread)
        if task.status == "FAILURE":
            self.failed[task.name] = task
        else:
            self.finished.append(task)
        self._say(task.summary(self.clock()))

    def _say(self, line: str) -> None:
        # not print(): kfp.local patches it to indent, writing to sys.stdout (this object)
        self.terminal.write(line + "\n")
        self.terminal.flush()

    def close_unfinished(self) -> None:
        """Report the tasks still open when the run stops (kfp.local raised before their rule)."""
        with self._lock:
            for thread, task in list(self._running.items()):
                task.status = task.status or "FAILURE"
                self._end(thread)

    def failure_report(self, log_path: Path) -> str:
        """The last lines of each failed task's output, and where its whole log is."""
        parts = []
        for task in self.failed.values():
            parts.append(f"--- last {len(task.tail)} lines of task {task.name!r} ---")
            parts += list(task.tail)
        parts.append(f"whole log: {log_path}")
        return "\n".join(parts)


@contextlib.contextmanager
def quiet(log_path: Path, terminal: TextIO) -> Iterator[TaskLog]:
    """Send kfp.local's output (``sys.stdout``) to ``log_path`` for the duration, one line per task to
    ``terminal``. The log is appended to as the run goes (it is a log, not an output taken for done)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handlers = root.handlers[:]
    with open(log_path, "a", encoding="utf-8") as log:
        task_log = TaskLog(log, terminal)
        # kfp.local also logs between tasks (e.g. cleaning its workspace) through the root logger
        root.handlers[:] = [logging.StreamHandler(task_log)]
        try:
            # the tasks' output reaches the log as it is written, not when a block fills (`tail -f` works)
            with contextlib.redirect_stdout(task_log), _environ("PYTHONUNBUFFERED", "1"):
                yield task_log
        finally:
            root.handlers[:] = handlers
            task_log.close_unfinished()
            task_log.flush()


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def plain(text: str) -> str:
    """``text`` without kfp.local's terminal colours."""
    return _ANSI.sub("", text)
