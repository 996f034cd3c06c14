"""Every device of one machine: ``--devices`` and a pool of one worker process per device.

``--devices`` forms:

- ``auto``: every CUDA GPU torch sees, else ``cpu:1``;
- ``cpu`` / ``cpu:N``: N worker processes on the CPU;
- ``cuda``: every CUDA GPU; ``cuda:0,cuda:1`` or ``cuda:0,1``: those GPUs (torch's indices).

Each worker gets ``floor(cores / workers)`` torch threads (at least 1; ``cpu:N`` refuses N above the
cores), so the processes together never oversubscribe the cores. With one device nothing changes: the
shards run in this process, as before. With several, :func:`active` makes :func:`vlprep.stage.run_local`
hand a fanned-out step's shards to a :class:`Pool`: one long-lived spawned process per device, shards
handed out as workers free up, markers returned in shard order, so the merged outputs are those of a
sequential run. A worker sees only its own GPU (``CUDA_VISIBLE_DEVICES``), so the steps' ``Runtime``
says ``cuda`` (or ``cpu``) and its model cache (``stage.cached_model``) keeps one model per worker.

Shards: a fan-out needs at least one shard per device to use them all; :meth:`Devices.shards` raises a
smaller ``--shards`` to the device count (logged), so the default ``--shards 1`` means one per device.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import connection
from multiprocessing.connection import Connection

from vlprep import VlprepError

log = logging.getLogger("vlprep.devices")

FORMS = "auto, cpu, cpu:N, cuda, cuda:0,cuda:1 or cuda:0,1"


@dataclass(frozen=True)
class Device:
    """One worker's device: ``cpu`` or ``cuda:I`` (torch's index in the parent), its torch threads and its
    number among the workers."""

    name: str
    threads: int
    worker: int = 0

    @property
    def label(self) -> str:
        """How messages name it: ``cuda:1``, or ``cpu worker 2`` (CPU workers share one name)."""
        return f"cpu worker {self.worker + 1}" if self.name == "cpu" else self.name

    def environment(self) -> dict[str, str]:
        """What the worker sets before torch loads: its only visible GPU (none on CPU) and its threads."""
        if self.name == "cpu":
            visible = ""
        else:
            index = int(self.name.split(":")[1])
            parent = os.environ.get("CUDA_VISIBLE_DEVICES")  # torch's index i is the i-th of these when set
            visible = parent.split(",")[index].strip() if parent else str(index)
        threads = str(self.threads)
        return {"CUDA_VISIBLE_DEVICES": visible, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


@dataclass(frozen=True)
class Devices:
    """The devices ``--devices`` named, one worker each."""

    devices: tuple[Device, ...]

    def __len__(self) -> int:
        return len(self.devices)

    @property
    def runtime_device(self) -> str:
        """The steps' ``Runtime.device``: the device itself when one, else its kind (a worker sees one GPU)."""
        if len(self.devices) == 1:
            return self.devices[0].name
        return "cpu" if self.devices[0].name == "cpu" else "cuda"

    def shards(self, asked: int, flag: str = "--shards") -> int:
        """At least one shard per device: a smaller ``asked`` is raised to the device count (logged)."""
        if asked < len(self.devices):
            log.info("%s %d < %d devices: using %d shards", flag, asked, len(self.devices), len(self.devices))
            return len(self.devices)
        return asked


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def parse(text: str, *, cpu_cores: int | None = None, gpus: int | None = None) -> Devices:
    """``--devices`` text -> :class:`Devices`; ``cpu_cores`` / ``gpus`` default to this machine's."""
    text = (text or "").strip().lower()
    cpu_cores = cores() if cpu_cores is None else cpu_cores
    if text in ("auto", "cuda") or text.startswith("cuda:"):
        gpus = cuda_count() if gpus is None else gpus
        if text == "auto":
            names = [f"cuda:{i}" for i in range(gpus)] or ["cpu"]
        else:
            names = [f"cuda:{i}" for i in _cuda_indices(text, gpus)]
    elif text == "cpu" or text.startswith("cpu:"):
        names = ["cpu"] * _cpu_workers(text, cpu_cores)
    else:
        raise VlprepError(f"--devices {text!r}: unknown form; use {FORMS}")
    threads = max(1, cpu_cores // len(names))
    return Devices(tuple(Device(name, threads, worker) for worker, name in enumerate(names)))


def _cuda_indices(text: str, gpus: int) -> list[int]:
    if gpus == 0:
        raise VlprepError(f"--devices {text!r}: no CUDA GPU visible to torch; use cpu:N or auto")
    if text == "cuda":
        return list(range(gpus))
    indices = []
    for part in text.split(","):
        number = part.strip().removeprefix("cuda:")
        if not number.isdigit():
            raise VlprepError(f"--devices {text!r}: {part!r} is not a GPU index; use {FORMS}")
        if int(number) >= gpus:
            raise VlprepError(f"--devices {text!r}: no GPU cuda:{number} (torch sees {gpus}: cuda:0..cuda:{gpus - 1})")
        if int(number) in indices:
            raise VlprepError(f"--devices {text!r}: cuda:{number} is named twice")
        indices.append(int(number))
    return indices


def _cpu_workers(text: str, cpu_cores: int) -> int:
    count = text.partition(":")[2] or "1"
    if not count.isdigit() or int(count) < 1:
        raise VlprepError(f"--devices {text!r}: the process count must be a whole number >= 1, e.g. cpu:2")
    if int(count) > cpu_cores:
        raise VlprepError(f"--devices {text!r}: {count} processes on {cpu_cores} cores would oversubscribe them; "
                          f"use cpu:{cpu_cores} or fewer")
    return int(count)


# ---------------------------------------------------------------- which devices run_local uses

_ACTIVE: contextvars.ContextVar[Devices | None] = contextvars.ContextVar("vlprep_devices", default=None)


@contextlib.contextmanager
def active(devices: Devices | None) -> Iterator[None]:
    """Within this block, ``stage.run_local`` runs fanned-out steps on ``devices`` (several: a pool)."""
    token = _ACTIVE.set(devices)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def pool_for_run() -> Iterator[Pool | None]:
    """A pool over the active devices when there are several (closed at the end), else None."""
    devices = _ACTIVE.get()
    if devices is None or len(devices) < 2:
        yield None
        return
    pool = Pool(devices)
    try:
        yield pool
    finally:
        pool.close()


# ---------------------------------------------------------------- the pool


@dataclass(frozen=True)
class _Worker:
    device: Device
    process: multiprocessing.process.BaseProcess
    messages: Connection  # what the worker sends back: its own pipe, so its death reads as end-of-file


class Pool:
    """One spawned worker process per device, started as a fan-out first needs it and kept for the run."""

    def __init__(self, devices: Devices):
        self.devices = devices
        self._context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._tasks = self._context.Queue()  # shared: a worker takes the next shard when it is free
        self._workers: list[_Worker] = []

    def map(self, label: str, call: Callable[[dict], dict], specs: Sequence[dict]) -> list[dict]:
        """``call(spec)`` for every spec on the workers; the markers in spec order. A failed shard raises
        naming the shard and its device, after the workers are stopped (also on ^C)."""
        try:
            payload = pickle.dumps(call)  # a module function or a functools.partial of one
        except Exception as e:  # noqa: BLE001 - a lambda or anything else pickle refuses
            raise VlprepError(f"{label}: the step cannot be sent to a worker process ({e}); use one device") from e
        try:
            self._start(label, len(specs))
            for index, spec in enumerate(specs):
                self._tasks.put((index, payload, spec))
            return self._gather(label, len(specs))
        except BaseException:
            self.close(stop=True)
            raise

    def _start(self, label: str, wanted: int) -> None:
        """Start workers up to ``wanted`` and wait until each is ready, so the shards spread over all."""
        new = []
        while len(self._workers) < min(wanted, len(self.devices)):
            device = self.devices.devices[len(self._workers)]
            reader, writer = self._context.Pipe(duplex=False)
            level = logging.getLogger().getEffectiveLevel()  # the workers log as this process does
            process = self._context.Process(target=serve, name=f"vlprep {device.label}",
                                            args=(device, self._tasks, writer, os.getpid(), level))
            process.start()  # not a daemon: a shard's DataLoader starts processes of its own
            writer.close()  # the worker holds the only writing end now
            self._workers.append(_Worker(device, process, reader))
            new.append(reader)
        for reader in new:
            self._receive(label, reader, {}, 0)  # "ready": torch loaded, threads set

    def _gather(self, label: str, count: int) -> list[dict]:
        markers: list = [None] * count
        running: dict[int, int] = {}  # worker pid -> shard index
        left = count
        while left:
            for reader in connection.wait([w.messages for w in self._workers]):
                kind, index, device, pid, value = self._receive(label, reader, running, count)
                where = f"shard {index + 1}/{count} on {device} (worker pid {pid})"
                if kind == "start":
                    running[pid] = index
                elif kind == "failed":
                    raise VlprepError(f"{label}: {where} failed: {value}")
                else:
                    markers[index], left = value, left - 1
                    running.pop(pid, None)
                    log.info("%s: %s %s", label, where, "already done" if value.get("skipped") else "done")
        return markers

    def _receive(self, label: str, reader: Connection, running: dict[int, int], count: int) -> tuple:
        """The worker's next message; its end-of-file (it died) raises naming the shard it was running."""
        try:
            return reader.recv()
        except EOFError:
            worker = next(w for w in self._workers if w.messages is reader)
            worker.process.join(timeout=10)
            pid = worker.process.pid
            when = f"during shard {running[pid] + 1}/{count}" if pid in running else "between shards"
            raise VlprepError(f"{label}: the worker on {worker.device.label} (pid {pid}) died {when} with exit code "
                              f"{worker.process.exitcode} (killed, e.g. out of memory?); rerun: done shards are kept"
                              ) from None

    def close(self, stop: bool = False) -> None:
        """Ask the workers to finish (``stop``: terminate them now) and wait for them."""
        if not stop:
            for _ in self._workers:
                self._tasks.put(None)
        for worker in self._workers:
            if stop:
                worker.process.terminate()
            worker.process.join(timeout=None if not stop else 10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.messages.close()
        self._tasks.cancel_join_thread()  # tasks left after an error must not block this process's exit
        self._workers = []


def serve(device: Device, tasks, messages: Connection, parent: int, level: int) -> None:
    """A worker: its device and threads set before torch loads, then shards until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the parent, which stops the workers
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    os.environ.update(device.environment(), RAYON_NUM_THREADS=str(device.threads))
    import torch

    torch.set_num_threads(device.threads)
    logging.basicConfig(level=level, format=f"%(asctime)s %(name)s [{device.label} pid {os.getpid()}] %(message)s")
    messages.send(("ready", -1, device.label, os.getpid(), None))
    for index, payload, spec in iter(tasks.get, None):
        messages.send(("start", index, device.label, os.getpid(), None))
        try:
            messages.send(("done", index, device.label, os.getpid(), pickle.loads(payload)(spec)))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            if not isinstance(e, VlprepError):
                log.exception("shard %d failed", index + 1)
            message = str(e) if isinstance(e, VlprepError) else f"{type(e).__name__}: {e}"
            messages.send(("failed", index, device.label, os.getpid(), message))


def _exit_with(parent: int) -> None:
    """End this worker within a second of its parent's death (kill -9, SIGTERM): no orphan keeps computing.
    Only finished parts and markers are ever published, so a rerun redoes the interrupted shard."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)
