"""One shape for every fanned-out stage: settings, work directory, plans, shards, and the local driver.

A stage module (``vlprep.stages.<name>``) provides

- ``Settings``: a frozen dataclass deriving from :class:`Settings`: everything that decides its
  outputs (inputs, weights, recipe, parameters), given by name. ``SHARD_FIELDS`` names the fields
  its shards depend on (default: all), so a rerun that changes only a merge-time field (say the
  output formats) reuses the shards while one with other weights redoes them.
- ``STAGE = Stage("<name>", Settings)``;
- ``plan(out, settings, *, num_shards, split)``: ``work = STAGE.start(out, settings)`` writes
  ``_work/<name>/settings.json``, then ``work.plan(items, ...)`` returns the shard specs;
- per-shard steps ``extract(spec, runtime)``: ``STAGE.run_shard(spec, fn)`` runs ``fn(shard, work)``
  unless the shard is done (its marker carries the settings fingerprint);
- ``merge(out)``: ``work = STAGE.open(out)`` (settings read back), ``work.collect()``, render the
  formats users read;
- ``steps(out, settings, *, runtime, num_shards, split)``: the :class:`Step` list in the pipeline's
  order; ``run`` = ``run_local(steps(...))``. The CLI and tests run a stage this way, KFP runs the
  same functions as components, so both produce the same files.

Layout under ``out``: ``_work/<stage>/settings.json``, ``_work/<stage>/holder.json`` (the run that
planned last: ``vlprep.holder``), ``_work/<stage>[/<step>]/plan.json``, shard parts and done-markers
beside their plan (``vlprep.shards``). ``STAGE.start`` first probes that a local ``out`` is writable,
refuses while a live run with other settings holds it, and removes the temp files killed runs left
under a local ``out``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from vlprep import VlprepError, holder, shards, storage
from vlprep.storage import local

log = logging.getLogger("vlprep.stage")


class Settings:
    """Mixin for a stage's frozen settings dataclass (written at plan time, read by every later step)."""

    SHARD_FIELDS: ClassVar[tuple[str, ...]] = ()  # fields the shards depend on; () = all

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict):
        """Back from JSON: lists become tuples again where the field is a tuple; unknown keys refuse."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - set(names))
        if unknown:
            raise VlprepError(f"{cls.__module__}.Settings: unknown setting(s) {unknown}; rerun the plan step")
        values = {k: tuple(v) if isinstance(v, list) and str(names[k].type).startswith("tuple") else v
                  for k, v in doc.items()}
        return cls(**values)

    def fingerprint(self, *fields: str) -> str:
        """sha256 (16 hex) of the named fields (default ``SHARD_FIELDS``, or all when that is empty)."""
        fields = fields or self.SHARD_FIELDS
        doc = {f: getattr(self, f) for f in fields} if fields else self.to_dict()
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def identity(self) -> str:
        """Fingerprint of every field: two runs with the same identity make the same outputs."""
        return self.fingerprint(*(f.name for f in dataclasses.fields(self)))


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def device_problem(device: str) -> str:
    """Why ``device`` is not a device name a step can run on ("" when it is one)."""
    if device in (None, "", "auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(device)):
        return ""
    return f"device {device!r}: use {DEVICE_FORMS}"


@dataclass(frozen=True)
class Runtime:
    """How a step runs (not what it computes): outputs do not depend on these. Checked when made, so a
    bad value stops a component or command before it plans or loads anything."""

    device: str = "auto"  # auto | cpu | cuda[:N]
    batch_size: int = 8
    num_workers: int = 2  # DataLoader decode processes

    def __post_init__(self):
        problem = device_problem(self.device)
        if problem:
            raise VlprepError(problem)
        for name, least in (("batch_size", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise VlprepError(f"{name} {value!r}: give an integer >= {least}")

    def resolved_device(self) -> str:
        import torch

        if self.device in ("", "auto", None):
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise VlprepError(f"device {self.device!r}: no CUDA GPU visible to torch; use 'cpu' or 'auto'")
        return self.device


@dataclass(frozen=True)
class Work:
    """A stage's work directory under one ``out``."""

    stage: Stage
    out: str
    run: str = ""  # "<run id>:<settings identity>" of the plan that made this Work (Stage.start)

    @property
    def root(self) -> str:
        return storage.join(self.out, "_work", self.stage.name)

    def uri(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def plan_uri(self, step: str = "") -> str:
        return self.uri(step, "plan.json") if step else self.uri("plan.json")

    @property
    def settings_uri(self) -> str:
        return self.uri("settings.json")

    @property
    def holder_uri(self) -> str:
        return self.uri("holder.json")

    def check_held(self, run: str, what: str) -> None:
        """Refuse ``what`` when a run with other settings took this output over from ``run``."""
        if run:
            run_id, _, identity = run.partition(":")
            holder.check_current(self.holder_uri, run_id, identity, what)

    def settings(self):
        """The settings written at plan time."""
        try:
            doc = json.loads(storage.read_text(self.settings_uri))
        except FileNotFoundError:
            raise VlprepError(f"{self.settings_uri}: settings missing; run the plan step first") from None
        return self.stage.settings.from_dict(doc)

    def plan(self, items: Sequence, *, num_shards: int = 1, split: str = "balanced", step: str = "",
             fingerprint: str | None = None, sort: bool = True) -> list[dict]:
        """Shard specs over ``items``; the marker fingerprint defaults to the settings' shard fingerprint."""
        if fingerprint is None:
            fingerprint = self.settings().fingerprint()
        specs = shards.plan(items, int(num_shards), self.uri(step) if step else self.root, split=split,
                            sort=sort, fingerprint=fingerprint)
        return [{**s, "out": self.out, **({"run": self.run} if self.run else {})} for s in specs]

    def collect(self, step: str = "") -> list[tuple[shards.Shard, dict]]:
        """Every shard's verified marker; refused when this process planned the output and another run
        with other settings has taken it over since (its plan is not this run's)."""
        self.check_held(self.run or _CLAIMS.get((self.stage.name, self.out), ""), f"{self.stage.name} merge")
        return shards.collect(self.plan_uri(step))

    def plan_doc(self, step: str = "") -> dict:
        return shards.plan_doc(self.plan_uri(step))


_CLAIMS: dict[tuple[str, str], str] = {}  # (stage, out) -> the run this process planned there (Stage.start)


class Stage:
    """A stage's name and settings class; the entry to its work directory."""

    def __init__(self, name: str, settings: type):
        self.name, self.settings = name, settings

    def start(self, out: str, settings: Settings) -> Work:
        """The plan step's first act: check that ``out`` is writable, take it for this run (refused while a
        live run with other settings holds it), remove what killed runs left there, and record
        ``settings`` for the steps that follow."""
        out = str(out)
        if not storage.is_remote(out):
            local.check_writable(out)
        work = Work(self, out)
        identity = settings.identity()
        run = f"{holder.claim(work.holder_uri, identity, out)}:{identity}"
        if not storage.is_remote(out):
            for path in local.remove_leftovers(out):
                log.info("%s: removed %s (left by a killed run)", self.name, path)
        storage.write_text(work.settings_uri, json.dumps(settings.to_dict(), indent=1, sort_keys=True))
        _CLAIMS[(self.name, out)] = run
        return Work(self, out, run)

    def open(self, out: str) -> Work:
        return Work(self, str(out))

    def of(self, spec: dict) -> Work:
        """The work directory a shard spec belongs to."""
        try:
            return Work(self, spec["out"])
        except KeyError:
            raise VlprepError(f"shard spec {spec}: no 'out'; make it with the {self.name} plan step") from None

    def run_shard(self, spec: dict, fn: Callable[[shards.Shard, Work], dict], step: str = "",
                  params: dict | None = None) -> dict:
        """``fn(shard, work)`` unless the shard's verified marker says it is done (see ``vlprep.shards``)."""
        work = self.of(spec)
        name = f"{self.name}/{step}" if step else self.name
        run = spec.get("run", "")
        what = f"{name} shard {spec.get('index')}"

        def checked(shard: shards.Shard) -> dict:
            work.check_held(run, what)  # before the work, and again before its marker is written
            result = fn(shard, work)
            work.check_held(run, what)
            return result

        marker = shards.run_shard(spec, checked, name, params)
        if run:
            holder.refresh(work.holder_uri, run.partition(":")[0])
        return marker


# ---------------------------------------------------------------- one process, the pipeline's order


@dataclass(frozen=True)
class Step:
    """One step of a stage as the pipeline runs it: ``name`` is the stage function (and component)
    name; ``call()`` runs it, or ``call(spec)`` for each spec of the plan step ``over``."""

    name: str
    call: Callable[..., Any]
    over: str = ""


def run_local(stage: str, steps: Sequence[Step]) -> dict[str, Any]:
    """Run the steps in order; returns each step's result (a list for fanned-out ones, in shard order).

    A fanned-out step's shards run in this process, or on a pool of worker processes when
    ``vlprep.devices.active`` names several devices (``--devices``): the same files either way."""
    from vlprep import devices

    results: dict[str, Any] = {}
    with devices.pool_for_run() as pool:
        for step in steps:
            if not step.over:
                results[step.name] = step.call()
            elif pool is not None:
                results[step.name] = pool.map(f"{stage} {step.name}", step.call, results[step.over])
            else:
                results[step.name] = [_run_shard(stage, step, spec, len(results[step.over]))
                                      for spec in results[step.over]]
    return results


def _run_shard(stage: str, step: Step, spec: dict, count: int) -> dict:
    marker = step.call(spec)
    log.info("%s %s: shard %d/%d %s", stage, step.name, int(spec["index"]) + 1, count,
             "already done" if marker.get("skipped") else "done")
    return marker


def skipped(markers: Sequence[dict]) -> int:
    """How many of a fan-out's shards were already done."""
    return sum(1 for m in markers if m.get("skipped"))


_MODELS: dict = {}


def cached_model(key: tuple, load: Callable[[], Any]):
    """One model kept per process (a local run loads it once for all shards); ``key`` says what it is."""
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load()
    return _MODELS[key]
