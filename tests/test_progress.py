"""Progress of long loops: a bar on a terminal, whole lines per interval elsewhere (vlprep.progress)."""

from __future__ import annotations

import io
import re

import pytest

from vlprep import VlprepError
from vlprep.progress import Progress, duration, interval_from_env


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Stream(io.StringIO):
    """A text stream that says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def run_loop(stream, clock, *, steps: int, seconds_per_step: float, interval: float = 30.0, total=None):
    with Progress("regions shard 1/2", total=total if total is not None else steps, unit="img", stream=stream,
                  clock=clock, interval=interval) as bar:
        for _ in range(steps):
            clock.now += seconds_per_step
            bar.advance(1)


def test_log_lines_one_per_interval_plus_start_and_end_and_no_carriage_return():
    stream, clock = Stream(tty=False), FakeClock()
    run_loop(stream, clock, steps=100, seconds_per_step=1.0, interval=30.0)  # 100 s of work
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the start (t=0), then t=30, 60, 90, and the close at t=100
    assert len(lines) == 5, lines
    counts = [int(re.search(r": (\d+)/100 img", line).group(1)) for line in lines]
    assert counts == [0, 30, 60, 90, 100]
    assert lines[0].endswith("progress regions shard 1/2: 0/100 img (0%), starting")
    assert all("1.00 img/s" in line for line in lines[1:])
    assert "ETA 1:10" in lines[1]  # 70 images left at 1 img/s
    assert "took 1:40" in lines[-1]


def test_log_interval_from_environment(monkeypatch):
    monkeypatch.setenv("VLPREP_PROGRESS_INTERVAL", "10")
    assert interval_from_env() == 10.0
    stream, clock = Stream(tty=False), FakeClock()
    with Progress("x", total=50, stream=stream, clock=clock) as bar:
        for _ in range(50):
            clock.now += 1.0
            bar.advance()
    assert len(stream.getvalue().splitlines()) == 1 + 5  # the start, t=10/20/30/40/50 (the last)
    monkeypatch.delenv("VLPREP_PROGRESS_INTERVAL")
    assert interval_from_env() == 30.0


@pytest.mark.parametrize("bad", ["soon", "-5", "nan"])
def test_bad_interval_is_one_clear_error(monkeypatch, bad):
    monkeypatch.setenv("VLPREP_PROGRESS_INTERVAL", bad)
    with pytest.raises(VlprepError, match="VLPREP_PROGRESS_INTERVAL"):
        interval_from_env()


def test_terminal_bar_has_count_rate_and_eta_and_redraws_in_place():
    stream, clock = Stream(tty=True), FakeClock()
    with Progress("keys", total=40, unit="img", stream=stream, clock=clock, interval=30.0) as bar:
        for _ in range(10):
            clock.now += 0.5
            bar.advance(2)
        middle = stream.getvalue().split("\r")[-1]
    assert re.search(r"\[#{12}\.{12}\] 20/40 img \(50%\), 4\.00 img/s, ETA 0:05", middle), middle
    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) == 11  # the start and every advance (0.5 s apart, more than the redraw gap)
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1


def test_one_step_loop_shows_its_start_and_end_once():
    stream, clock = Stream(tty=False), FakeClock()
    with Progress("shard", total=3, unit="img", stream=stream, clock=clock, interval=30.0) as bar:
        clock.now += 450.0
        bar.advance(3)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].endswith("3/3 img (100%), 0.01 img/s, took 7:30"), lines


def test_failures_and_unknown_total():
    stream, clock = Stream(tty=False), FakeClock()
    with Progress("phrases", stream=stream, clock=clock, interval=30.0) as bar:
        clock.now += 2.0
        bar.advance(10, failed=3)
    last = stream.getvalue().splitlines()[-1]
    assert "phrases: 10 items, 5.00 items/s, took 0:02, 3 failed" in last


def test_duration():
    assert [duration(s) for s in (0, 59.6, 61, 3600 + 62)] == ["0:00", "1:00", "1:01", "1:01:02"]
