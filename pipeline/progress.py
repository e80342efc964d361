"""The picture of a reproduction, from the files it writes: which stage is done, running or waiting, for how
long, what the running stage is doing (common/progress.py) and the time left.

``reproduce`` shows it while it runs (:class:`Watcher`: redrawn in place on a terminal; into a log or a pipe, a
line per running stage at most every minute, only when something changed); ``reproduce --status --out DIR`` prints it
once from another terminal or after the run (:func:`status`), reading files only.

The time left: the remaining stages' compute (pipeline/cost.py) at the rate the finished stages of this run
achieved (their FLOPs over their seconds); before any stage has finished, at the machine's matrix-multiply rate,
which makes it a floor. With ``--jobs N`` it is wall-clock time: the stages still to run are laid out on N slots in
the runner's order, each starting when its inputs are done (:func:`wall_clock`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from rich.console import RenderableType

from common import progress
from common.files import read_json
from pipeline.stages import ATTEMPT_JSON, LOCK, STAGE_JSON, Stage, stage_dir


def running_here(out: Path) -> bool:
    """Whether a reproduction holds OUT's lock now (probed with a shared, non-blocking flock on the existing
    lock file: nothing is created or changed)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(Path(out) / LOCK, os.O_RDONLY)
    except OSError:
        return False  # the runner removes its lock file when it stops
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False  # a lock file left by a killed run
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _started(record: dict | None) -> float | None:
    try:
        return datetime.fromisoformat(record["started"]).timestamp() if record else None
    except (KeyError, ValueError, TypeError):
        return None


def stage_state(out: Path, stage: Stage, live: bool) -> dict:
    """``done`` (its stage.json belongs to its last attempt), ``running`` / ``interrupted`` (an attempt without
    a record, with the run alive or not) or ``waiting``; seconds taken or elapsed; the running stage's progress."""
    directory = stage_dir(out, stage.name)
    record, attempt = read_json(directory / STAGE_JSON), read_json(directory / ATTEMPT_JSON)
    if record is not None and (attempt is None or attempt.get("started") == record.get("started")):
        return {"name": stage.name, "state": "done", "seconds": record.get("timings", {}).get("total")}
    if attempt is not None:
        started = _started(attempt)
        return {"name": stage.name, "state": "running" if live else "interrupted",
                "seconds": time.time() - started if started and live else None,
                "progress": progress.read(directory)}
    return {"name": stage.name, "state": "waiting", "seconds": None}


def describe_progress(entry: dict | None) -> str:
    if not entry:
        return "starting"
    total = entry.get("total")
    share = f" ({100 * entry['done'] / total:.0f}%)" if total else ""
    return f"{entry['task']}: {entry['done']}/{total if total is not None else '?'} {entry['unit']}{share}"


def minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 60:.1f} min"


def wall_clock(work: dict[str, float], running: Sequence[str], deps: dict[str, Sequence[str]], jobs: int) -> float:
    """Seconds until the stages in ``work`` (seconds of work left each) are all done on ``jobs`` slots, scheduled as
    the runner does: the ``running`` ones hold a slot from now; whenever a slot is free, the first stage in
    ``work``'s order whose inputs are all done starts on it. One slot: the sum of the work."""
    now, finish = 0.0, {name: work[name] for name in running}
    active = dict(finish)
    pending = [name for name in work if name not in finish]

    def ready(name: str) -> bool:  # a dependency outside ``work`` is done already
        return all(d not in work or (d in finish and finish[d] <= now) for d in deps.get(name, ()))

    while pending:
        for name in [n for n in pending if ready(n)][: max(0, jobs - len(active))]:
            active[name] = finish[name] = now + work[name]
            pending.remove(name)
        if not active:  # nothing can start (an input is missing): count the rest one after another
            return max(finish.values(), default=now) + sum(work[n] for n in pending)
        now = min(active.values())
        active = {n: t for n, t in active.items() if t > now}
    return max(finish.values(), default=0.0)


class Estimate:
    """Seconds left, from each stage's FLOPs (computed once: it parses every command) and the run's rate, on
    ``jobs`` slots (``--jobs``)."""

    def __init__(self, stages: Sequence[Stage], out: Path, extra_args: Sequence[str], jobs: int = 1) -> None:
        self.stages, self.out, self.extra_args = list(stages), Path(out), list(extra_args)
        self.jobs = max(1, int(jobs))
        self.deps = {stage.name: stage.deps for stage in self.stages}
        self.flops: dict[str, float] | None = None
        self.floor_rate: float | None = None

    def compute(self) -> None:
        from pipeline import cost

        try:
            parts = cost.reproduction_flops(self.stages, self.out, self.extra_args)
            self.flops = {name: float(sum(p.values())) for name, p in parts.items()}
            self.floor_rate = cost.matmul_rate(seconds=0.2)
        except Exception:  # an estimate must never stop the run it describes
            self.flops = {}

    def seconds_left(self, states: Sequence[dict]) -> tuple[float | None, str]:
        if not self.flops:
            return None, ""
        done = [s for s in states if s["state"] == "done" and s["seconds"]]
        flops_done = sum(self.flops.get(s["name"], 0.0) for s in done)
        seconds_done = sum(s["seconds"] for s in done)
        if flops_done > 0 and seconds_done > 0:
            rate, basis = flops_done / seconds_done, "at this run's rate so far"
        elif self.floor_rate:
            rate, basis = self.floor_rate, "a floor: at the matmul rate, no stage has finished yet"
        else:
            return None, ""
        work, running = {}, []
        for s in states:
            if s["state"] == "done":
                continue
            work[s["name"]] = self.flops.get(s["name"], 0.0) / rate
            if s["state"] == "running":
                running.append(s["name"])
                work[s["name"]] = max(0.0, work[s["name"]] - (s.get("seconds") or 0.0))
        if self.jobs > 1:
            basis += f", {self.jobs} stages at a time"
        return wall_clock(work, running, self.deps, self.jobs), basis


def picture(out: Path, stages: Sequence[Stage], estimate: Estimate | None = None) -> list[str]:
    """Every stage's line, and a summary: done of N, elapsed, time left."""
    live = running_here(out)
    states = [stage_state(out, s, live) for s in stages]
    lines = []
    for i, s in enumerate(states, start=1):
        detail = f"  {describe_progress(s.get('progress'))}" if s["state"] in ("running", "interrupted") else ""
        lines.append(f"[{i}/{len(states)}] {s['name']:<22} {s['state']:<11} {minutes(s['seconds']):>10}{detail}")
    done = sum(s["state"] == "done" for s in states)
    spent = sum(s["seconds"] or 0.0 for s in states if s["state"] in ("done", "running"))
    summary = f"{done} of {len(states)} stages done, {minutes(spent) or '0 min'} of stage time"
    if estimate is not None and done < len(states):
        left, basis = estimate.seconds_left(states)
        if left is not None:
            summary += f", about {minutes(left)} left ({basis})"
    state = "running" if live else "not running"
    return [*lines, f"{summary}; the reproduction is {state}"]


def status(out: Path, stages: Sequence[Stage], extra_args: Sequence[str] = (), jobs: int = 1) -> str:
    """``reproduce --status``: the picture, once."""
    estimate = Estimate(stages, out, extra_args, jobs)
    estimate.compute()
    return "\n".join(picture(out, stages, estimate))


# How often the live view redraws on a terminal, and how often plain lines may appear in a log or a pipe.
TERMINAL_REFRESH_S, PLAIN_EVERY_S = 1.0, 60.0


class Watcher:
    """While the runner runs, show what the stages are doing.

    On a terminal: the whole picture (every stage's state, the running stages' progress, the time left), redrawn
    in place every ``TERMINAL_REFRESH_S`` seconds by rich's live display; the runner's own lines print above it.
    Otherwise (a log file, a pipe, CI): a plain line per running stage when its progress has changed, at most every
    ``every_s`` seconds (default ``PLAIN_EVERY_S``), never a redraw and never a flood."""

    def __init__(self, out: Path, stages: Sequence[Stage], extra_args: Sequence[str] = (),
                 echo: Callable[[str], None] = print, every_s: float | None = None,
                 terminal: bool | None = None, jobs: int = 1) -> None:
        self.out, self.stages, self.echo = Path(out), list(stages), echo
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.every_s = every_s if every_s is not None else (TERMINAL_REFRESH_S if self.terminal else PLAIN_EVERY_S)
        self.estimate = Estimate(stages, out, extra_args, jobs)
        self._stop = threading.Event()
        # Neither thread is a daemon, and both are joined on exit: a daemon thread still importing the CLI or
        # writing to stdout when the interpreter shuts down makes CPython abort the run (SIGABRT), seen in CI.
        self._thread = threading.Thread(target=self._run, name="reproduce-progress")
        # The estimate parses every command (seconds): compute it beside, and show progress from the start.
        self._estimating = threading.Thread(target=self.estimate.compute, name="reproduce-estimate")
        self._shown: dict[str, str] = {}
        self._live = None

    def __enter__(self) -> Watcher:
        if self.terminal:
            from rich.live import Live

            # redirect_stdout: the runner's print()s appear above the picture instead of breaking it
            self._live = Live(self.render(), refresh_per_second=4, auto_refresh=False, redirect_stdout=True,
                              redirect_stderr=True)
            self._live.start()
        self._estimating.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()  # at most one redraw away once stopped
        self._estimating.join()  # bounded: parsing the commands and a 0.2 s matmul, errors caught
        if self._live is not None:
            self._live.update(self.render(), refresh=True)  # the final picture stays on screen
            self._live.stop()

    def render(self) -> RenderableType:
        from rich.text import Text

        return Text("\n".join(picture(self.out, self.stages, self.estimate)))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if self._live is not None:
                self._live.update(self.render(), refresh=True)
            else:
                self.tick()

    def tick(self) -> None:
        """The plain lines: one per running stage whose progress changed since the last one."""
        states = [stage_state(self.out, s, live=True) for s in self.stages]
        left, _ = self.estimate.seconds_left(states)
        for i, s in enumerate(states, start=1):
            if s["state"] != "running":
                continue
            line = describe_progress(s.get("progress"))
            if self._shown.get(s["name"]) == line:
                continue
            self._shown[s["name"]] = line
            tail = f"; about {minutes(left)} left in all" if left is not None else ""
            self.echo(f"[{i}/{len(states)}] {s['name']}: {line}, {minutes(s['seconds'])} in{tail}")
