"""Runs a preset's stages in dependency order, each in a subprocess, with caching, resume and failure reports.

Per stage, under ``OUT/<stage>/``:

- ``stage.log``     stdout and stderr of every command of the stage (each preceded by the command line);
- ``attempt.json``  the key of the attempt in progress, written before the first command: an unfinished fit
                    with the same key and a ``checkpoints/last.ckpt`` resumes with ``--ckpt_path last``;
- ``stage.json``    written last, atomically: key, run id, results, timings, versions. A stage whose
                    stage.json holds the current key is skipped.

Keys chain through run ids: a stage's key includes the run ids of its dependencies, and every run gets a new
one, so rerunning a stage (``--force``, a changed config, a lost stage.json) reruns everything downstream.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from common import progress
from common.errors import UserError
from common.files import FileLock, read_json, write_json_atomic
from pipeline import outputs
from pipeline.launch import Launch, Publisher
from pipeline.preflight import command_error
from pipeline.progress import Watcher
from pipeline.stages import (  # noqa: F401
    ATTEMPT_JSON,
    FIT,
    IMPORT,
    IMPORTED_JSON,
    LOCK,
    LOG,
    MEASURE_JSON,
    NUMERICS_JSON,
    REPO,
    REPRODUCTION_JSON,
    STAGE_JSON,
    Stage,
    commands,
    last_checkpoint,
    seed_of,
    stage_dir,
    stage_key,
)

LOG_TAIL = 25

Execute = Callable[[list[str], Path, dict], int]
Preflight = Callable[[Sequence[str]], "str | None"]


class PipelineError(UserError, RuntimeError):
    """The pipeline cannot go on; the message names the stage and what to do."""


class StageStopped(Exception):
    """A stage whose commands the runner stopped (another stage failed, Ctrl-C, SIGTERM): no record is written,
    and its attempt resumes or reruns next time, as after a kill."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"stage {stage!r} stopped before it finished")


class StageFailed(PipelineError):
    """A command of a stage failed."""

    def __init__(self, stage: str, step: str, code: int, log: Path, argv: Sequence[str] = (), why: str = "") -> None:
        self.stage, self.step, self.code, self.log = stage, step, code, log
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:] if log.is_file() else []
        super().__init__(
            f"stage {stage!r} failed: {why or f'its {step} command exited with code {code}'}.\n"
            f"  command: {shlex.join(argv)}\n  log: {log}\n"
            f"--- last {len(tail)} lines of {log.name} ---\n" + "\n".join(tail)
        )


_RUNNING: set[subprocess.Popen] = set()  # children of run_subprocess, for stop_children
_RUNNING_LOCK = threading.Lock()


def stop_children() -> None:
    """Terminate every command :func:`run_subprocess` is waiting on (the concurrent runner's Ctrl-C / SIGTERM /
    first failure: the threads that wait on them then return)."""
    with _RUNNING_LOCK:
        children = list(_RUNNING)
    for child in children:
        if child.poll() is None:
            child.terminate()


def run_subprocess(argv: list[str], log: Path, env: dict) -> int:
    """Run ``argv`` with stdout and stderr appended to ``log``; the exit code. If the pipeline stops while the
    command runs (Ctrl-C, or SIGTERM under :func:`exit_on_sigterm`), the command is stopped too: an orphaned
    fit would go on writing into a stage that the next run resumes."""
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(argv)}\n")
        f.flush()
        child = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        with _RUNNING_LOCK:
            _RUNNING.add(child)
        try:
            return child.wait()
        finally:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            with _RUNNING_LOCK:
                _RUNNING.discard(child)


def machine_slices(jobs: int, cpu_threads: int | None = None, gpus: int | None = None) -> list[dict[str, str]]:
    """The environment of each of ``jobs`` concurrent stages: a disjoint share of the CPU threads
    (``OMP_NUM_THREADS``, which torch reads at start) and, on a GPU host, a disjoint set of GPUs
    (``CUDA_VISIBLE_DEVICES``, contiguous, as many per stage as divide evenly)."""
    if jobs < 1:
        raise PipelineError(f"--jobs must be >= 1, got {jobs}")
    cpu_threads = cpu_threads or os.cpu_count() or 1
    if gpus is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = len([d for d in visible.split(",") if d.strip()]) if visible is not None else _cuda_device_count()
    if gpus and gpus < jobs:
        raise PipelineError(f"--jobs {jobs} needs at least {jobs} GPUs (one set per running stage); this host has "
                            f"{gpus}. Use --jobs {gpus} or fewer")
    slices = []
    for slot in range(jobs):
        env = {"OMP_NUM_THREADS": str(max(1, cpu_threads // jobs))}
        if gpus:
            per = gpus // jobs
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(slot * per, (slot + 1) * per))
        slices.append(env)
    return slices


def _cuda_device_count() -> int:
    try:
        import torch  # only to count GPUs; the stages import it themselves
    except ImportError:
        return 0
    return torch.cuda.device_count()


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Inside, SIGTERM (``kill PID``, a cluster's job stop) raises SystemExit, so cleanup runs as after Ctrl-C;
    the previous handler comes back on the way out (``reproduce`` may run inside a test or a notebook)."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def versions() -> dict:
    """Python, torch and Lightning versions, and the git commit of the suite (``+dirty`` if modified)."""
    found = {"python": platform.python_version()}
    for package in ("torch", "pytorch-lightning"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    try:
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, timeout=10).stdout
        found["git"] = commit.strip() + ("+dirty" if dirty.strip() else "") if commit.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        found["git"] = None
    return found


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``: two pipelines writing the same stages would corrupt each other."""
    lock = FileLock(path)
    if not lock.acquire(blocking=False):
        raise PipelineError(f"another reproduction is running in {path.parent} (it holds {path}); wait for it "
                            "or use another --out")
    try:
        yield
    finally:
        lock.release()


@dataclass(frozen=True)
class Decision:
    """What the runner does with a stage: ``cached`` (skip), ``run`` (from scratch) or ``resume``; in a dry run
    also ``blocked`` (a config file is missing)."""

    stage: Stage
    action: str
    reason: str
    key: str | None = None  # None while an upstream stage has yet to run (dry run)


class Runner:
    """Runs ``stages`` (a preset, in dependency order) into ``out``."""

    def __init__(self, stages: Sequence[Stage], out: str | Path, *, preset: str, extra_args: Sequence[str] = (),
                 force: Sequence[str] = (), only: Sequence[str] = (), execute: Execute = run_subprocess,
                 preflight: Preflight | None = command_error, echo: Callable[[str], None] = print,
                 jobs: int = 1, slices: Sequence[dict[str, str]] | None = None, launch: Launch | None = None,
                 watch: bool = False, sources: Mapping[str, Any] | None = None) -> None:
        """
        Args:
            extra_args: appended to every ``train.py`` command (e.g. ``--trainer.devices 8``); part of the keys.
            force: stages to rerun from scratch (with, through the keys, everything downstream).
            only: run just these stages and what they need (dependencies come from the cache when finished).
            execute: runs one command with its output to a log and returns the exit code (tests replace it).
            preflight: the error a command would stop with, or None (default: parse it with the command's own
                parser); every command of every selected stage is checked before the first runs. None skips it
                (tests whose fake stages are not real commands).
            jobs: stages run at once, each as soon as its dependencies are done, each in its own slice of the
                machine (``slices``, default :func:`machine_slices`); 1: one after another, in order.
            launch: how each command starts (pipeline/launch.py: here, through srun, or through torchrun);
                its layout arguments must already be among ``extra_args`` (:meth:`Launch.trainer_args`).
            watch: print what the running stages are doing while they run (pipeline/progress.py).
            sources: what changed the preset's graph (``--use``, ``--released``), kept in reproduction.json so
                that ``--status`` rebuilds the same graph.
        """
        self.stages, self.out, self.preset = list(stages), Path(out), preset
        self.extra_args, self.force, self.execute, self.echo = list(extra_args), set(force), execute, echo
        self.preflight, self._checked = preflight, False
        by_name = {s.name: s for s in self.stages}
        for flag, names in (("--force", force), ("--only", only)):
            if unknown := [n for n in names if n not in by_name]:
                raise PipelineError(f"{flag} {' '.join(unknown)}: no such stage in preset {preset!r}; its stages "
                                    f"are: {', '.join(by_name)}")
        wanted = set(only) if only else set(by_name)
        for stage in reversed(self.stages):  # dependencies come earlier: one backward pass closes the set
            if stage.name in wanted:
                wanted |= set(stage.deps)
        self.selected = [s for s in self.stages if s.name in wanted]
        if outside := self.force - wanted:
            raise PipelineError(f"--force {' '.join(sorted(outside))}: not among the stages selected by --only")
        self._versions: dict | None = None
        self.jobs, self.launch = jobs, launch or Launch()
        if jobs > 1 and self.launch.kind != "local":
            raise PipelineError(f"--jobs {jobs} with --launcher {self.launch.kind}: stages side by side are for one "
                                "host (GPU sets or CPU threads); across an allocation every stage takes all its "
                                "nodes, so use --jobs 1")
        self._publisher: Publisher | None = None
        self.watch = watch
        self.sources = dict(sources or {})
        self._stopping = threading.Event()  # set when a concurrent run stops its other stages
        self.slices = list(slices) if slices is not None else (machine_slices(jobs) if jobs > 1 else [{}])
        if len(self.slices) < jobs:
            raise PipelineError(f"{jobs} jobs need {jobs} machine slices, got {len(self.slices)}")

    # ------------------------------------------------------------------------------------------- decisions

    def decide(self, stage: Stage, dep_ids: dict[str, str] | None) -> Decision:
        """``dep_ids`` maps each dependency to its run id; None if one of them is yet to run."""
        directory = stage_dir(self.out, stage.name)
        if dep_ids is None:
            return Decision(stage, "run", "an upstream stage reruns")
        key = stage_key(stage, preset=self.preset, dep_ids=dep_ids, extra_args=self.extra_args)
        if stage.name in self.force:
            return Decision(stage, "run", "forced (--force)", key)
        has_checkpoint = stage.kind == "train" and last_checkpoint(self.out, stage.name).is_file()
        record = read_json(directory / STAGE_JSON)
        if record is not None and record.get("key") == key and (stage.kind == "measure" or has_checkpoint):
            return Decision(stage, "cached", "finished with the same key", key)
        attempt = read_json(directory / ATTEMPT_JSON)
        if has_checkpoint and attempt is not None and attempt.get("key") == key:
            return Decision(stage, "resume", "unfinished run with the same key and a last.ckpt", key)
        if record is None:
            return Decision(stage, "run", "not run yet", key)
        if record.get("key") == key:
            return Decision(stage, "run", "its last.ckpt is missing", key)
        return Decision(stage, "run", "inputs changed (config bytes, arguments or an upstream run)", key)

    def missing_configs(self) -> dict[str, list[Path]]:
        """Config files of selected stages that do not exist, by stage."""
        missing = {s.name: [f for f in s.config_files() if not f.is_file()] for s in self.selected}
        return {name: files for name, files in missing.items() if files}

    def plan(self) -> list[Decision]:
        """Every selected stage's decision, without running anything (``--dry-run``)."""
        decisions: dict[str, Decision] = {}
        missing = self.missing_configs()
        for stage in self.selected:
            if stage.name in missing:
                files = ", ".join(map(str, missing[stage.name]))
                decisions[stage.name] = Decision(stage, "blocked", f"missing {files}")
                continue
            upstream_reruns = any(decisions[d].action != "cached" for d in stage.deps)
            decisions[stage.name] = self.decide(stage, None if upstream_reruns else self._dep_ids(stage))
        return list(decisions.values())

    def _dep_ids(self, stage: Stage) -> dict[str, str]:
        ids = {}
        for dep in stage.deps:
            record = read_json(stage_dir(self.out, dep) / STAGE_JSON) or {}
            if not record.get("run_id"):
                raise PipelineError(f"stage {stage.name!r} needs {dep!r}, which has not finished "
                                    f"({stage_dir(self.out, dep) / STAGE_JSON} is missing or damaged)")
            ids[dep] = record["run_id"]
        return ids

    def check_commands(self) -> int:
        """Parse every command of every selected stage with its own parser (builds nothing); raise PipelineError
        at the first that would fail, naming the stage. The number of commands checked."""
        if self.preflight is None or self._checked:
            return 0
        checked = 0
        for stage in self.selected:
            for label, argv in commands(stage, self.out, self.extra_args):
                if error := self.preflight(argv):
                    raise PipelineError(f"stage {stage.name!r}: its {label} command would fail: {error}\n"
                                        f"  command: {shlex.join(argv)}\nFix the stage's config or the arguments "
                                        "passed to every stage (--stage-args, --trainer.*); nothing has run")
                checked += 1
        self._checked = True
        return checked

    # --------------------------------------------------------------------------------------------- running

    def run(self) -> dict[str, dict]:
        """Run (or skip) every selected stage in order; the stage records. Raises StageFailed on the first
        failure, after which nothing else runs."""
        if missing := self.missing_configs():  # fail now, not after hours of upstream training
            raise PipelineError("missing config files: " + "; ".join(
                f"stage {name!r} needs {', '.join(map(str, files))}" for name, files in missing.items())
                + ". Write them, or leave those stages out with --only STAGE ...")
        self.check_commands()
        reproduction = self.reproduction_id()
        self._stopping.clear()
        with exclusive(self.out / LOCK):
            if self.launch.kind == "torchrun" and self.launch.nodes > 1:  # the other nodes follow our launches
                self._publisher = Publisher(self.out, self.launch.rdzv_id)
            finished = False
            watcher = (Watcher(self.out, self.selected, self.extra_args, self.echo, jobs=self.jobs) if self.watch
                       else nullcontext())
            try:
                with watcher:
                    records = self._run_all(reproduction) if self.jobs == 1 else self._run_concurrently(reproduction)
                finished = True
                return records
            finally:
                if self._publisher is not None:
                    self._publisher.end(finished)

    def _run_all(self, reproduction: str) -> dict[str, dict]:
        records = {}
        for i, stage in enumerate(self.selected, start=1):
            decision = self.decide(stage, self._dep_ids(stage))
            prefix = f"[{i}/{len(self.selected)}] {stage.name}:"
            if decision.action == "cached":
                self.echo(f"{prefix} cached ({decision.reason})")
                records[stage.name] = read_json(stage_dir(self.out, stage.name) / STAGE_JSON)
                continue
            self.echo(f"{prefix} {decision.action} ({decision.reason}); log: {stage_dir(self.out, stage.name) / LOG}")
            records[stage.name] = self._run_stage(decision, reproduction)
            self.echo(f"{prefix} done in {records[stage.name]['timings']['total'] / 60:.1f} min")
        return records

    def _run_concurrently(self, reproduction: str) -> dict[str, dict]:
        """Up to ``jobs`` stages at once, each started as soon as its dependencies are done, each with its own
        machine slice (environment) and its own folder; the first failure, Ctrl-C or SIGTERM stops the others
        (their attempts resume or rerun next time, as after a kill)."""
        records: dict[str, dict] = {}
        waiting = list(self.selected)
        free = list(range(self.jobs))
        running: dict[Future, tuple[Stage, int]] = {}
        total = len(self.selected)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            try:
                while waiting or running:
                    cached_now = False
                    for stage in [s for s in waiting if all(d in records for d in s.deps)]:
                        decision = self.decide(stage, self._dep_ids(stage))
                        prefix = f"[{self.selected.index(stage) + 1}/{total}] {stage.name}:"
                        if decision.action == "cached":
                            waiting.remove(stage)
                            self.echo(f"{prefix} cached ({decision.reason})")
                            records[stage.name] = read_json(stage_dir(self.out, stage.name) / STAGE_JSON)
                            cached_now = True
                            continue
                        if not free:
                            break
                        waiting.remove(stage)
                        slot = free.pop(0)
                        where = " ".join(f"{k}={v}" for k, v in self.slices[slot].items())
                        self.echo(f"{prefix} {decision.action} ({decision.reason}) on slice {slot} ({where}); "
                                  f"log: {stage_dir(self.out, stage.name) / LOG}")
                        running[pool.submit(self._run_stage, decision, reproduction, self.slices[slot])] = (
                            stage, slot)
                    if cached_now:
                        continue  # what waited on the cached stages may be ready now: look again
                    if not running:
                        if waiting:  # cannot happen for a checked graph: dependencies come first
                            raise PipelineError(f"stages {[s.name for s in waiting]} wait on stages that never ran")
                        break
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        stage, slot = running.pop(future)
                        free.append(slot)
                        records[stage.name] = future.result()  # StageFailed: stop the others (below)
                        prefix = f"[{self.selected.index(stage) + 1}/{total}] {stage.name}:"
                        self.echo(f"{prefix} done in {records[stage.name]['timings']['total'] / 60:.1f} min")
            except BaseException:
                self._stopping.set()  # before the children go: a stopped command must not count as finished
                stop_children()
                raise
        return records

    def reproduction_id(self) -> str:
        """One id per OUT folder (kept across reruns): the wandb group of every stage."""
        path = self.out / REPRODUCTION_JSON
        info = read_json(path)
        if info is None:
            self.out.mkdir(parents=True, exist_ok=True)
            info = {"id": f"{self.preset}-{datetime.now():%Y%m%d-%H%M%S}", "preset": self.preset, "created": now()}
        elif info.get("preset") != self.preset:
            raise PipelineError(f"{self.out} holds a reproduction of preset {info.get('preset')!r}, not "
                                f"{self.preset!r}: choose another --out")
        if info.get("sources") != self.sources or info.get("jobs") != self.jobs:  # this run's --use / --released,
            write_json_atomic(path, {**info, "sources": self.sources, "jobs": self.jobs})  # --jobs for --status
        return info["id"]

    def _run_stage(self, decision: Decision, reproduction: str, machine_slice: dict[str, str] | None = None) -> dict:
        stage, directory = decision.stage, stage_dir(self.out, decision.stage.name)
        resume = decision.action == "resume"
        if not resume:
            self._clear(directory)
        directory.mkdir(parents=True, exist_ok=True)
        log = directory / LOG
        started, start = now(), time.monotonic()
        write_json_atomic(directory / ATTEMPT_JSON, {"key": decision.key, "started": started})
        ours = {"WANDB_RUN_GROUP": reproduction, "WANDB_JOB_TYPE": stage.name,
                progress.PROGRESS_FILE_ENV: str(directory / progress.PROGRESS_JSON),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                **(machine_slice or {})}
        env = {**os.environ, **ours}
        steps = commands(stage, self.out, self.extra_args, resume=resume)
        timings = {}
        for label, argv in steps:
            if label not in (FIT, IMPORT):  # an earlier attempt's test / measure output must not be read as ours
                shutil.rmtree(directory / label, ignore_errors=True)
                (directory / MEASURE_JSON).unlink(missing_ok=True)
            kind = "measure" if label == IMPORT else stage.kind  # an import is one process, like a measure
            launched = self.launch.wrap(argv, kind, f"{decision.key[:16]}-{label}-{time.time_ns()}")
            if self._publisher is not None and kind == "train":
                self._publisher.publish(stage.name, launched, ours)
            if self._stopping.is_set():
                raise StageStopped(stage.name)
            t0 = time.monotonic()
            code = self.execute(launched, log, env)
            timings[label] = round(time.monotonic() - t0, 2)
            if self._stopping.is_set():  # stopped by us: whatever it returned, it did not finish
                raise StageStopped(stage.name)
            if code != 0:
                raise StageFailed(stage.name, label, code, log, launched)
            if label == FIT and not last_checkpoint(self.out, stage.name).is_file():
                raise StageFailed(stage.name, label, code, log, argv, why=(
                    f"fit wrote no {last_checkpoint(self.out, stage.name)}: its config needs a "
                    "pytorch_lightning.callbacks.ModelCheckpoint with save_last: true"))
        try:
            results = self._results(stage, directory)
        except (outputs.MissingOutputs, OSError, ValueError, KeyError) as err:
            raise StageFailed(stage.name, "results", 0, log, steps[-1][1], why=str(err)) from err
        timings["total"] = round(time.monotonic() - start, 2)
        record = {
            "stage": stage.name, "kind": stage.kind, "key": decision.key,
            "run_id": f"{decision.key[:16]}-{now()}", "preset": self.preset, "reproduction": reproduction,
            "config": stage.config, "base": list(stage.base), "measure": stage.measure,
            "overrides": list(stage.overrides),
            "extra_args": self.extra_args, "seed": seed_of(stage), "deps": self._dep_ids(stage),
            "commands": {label: argv for label, argv in steps}, "resumed": resume,
            "results": results, "artifacts": self._artifacts(stage, directory),
            # the constructed set a fit trained on (its size, statistics, key), None for the others
            "constructed": outputs.constructed_record(directory) if stage.kind == "train" else None,
            "timings": timings, "started": started, "finished": now(), "versions": self.versions(),
            "machine_slice": machine_slice or {}, "launch": self.launch.describe(),
            "numerics": read_json(directory / NUMERICS_JSON),  # the fit's resolved precision (train stages)
            "imported": read_json(directory / IMPORTED_JSON),  # --use: where the stage's model came from
        }
        write_json_atomic(directory / STAGE_JSON, record)
        return record

    def _clear(self, directory: Path) -> None:
        """Start a stage afresh: delete its folder if the pipeline made it; move anything else aside."""
        if not directory.exists():
            return
        if (directory / ATTEMPT_JSON).exists() or (directory / STAGE_JSON).exists():
            shutil.rmtree(directory)
        elif any(directory.iterdir()):  # e.g. a run made by hand: never delete someone's work
            aside = directory.with_name(f"{directory.name}.before-{datetime.now():%Y%m%d-%H%M%S}")
            directory.rename(aside)
            self.echo(f"  {directory} was not made by the pipeline: moved to {aside}")

    def _results(self, stage: Stage, directory: Path) -> dict:
        if stage.kind == "measure":
            results = read_json(directory / MEASURE_JSON)
            if results is None:
                raise outputs.MissingOutputs(f"the measure {stage.measure!r} wrote no {directory / MEASURE_JSON}")
            return results
        return {t.label: outputs.read_test_run(directory / t.label) for t in stage.tests}

    def _artifacts(self, stage: Stage, directory: Path) -> dict:
        grid = outputs.constructed_grid(directory) if stage.kind == "train" else None  # the fit's run dir
        return {"checkpoint": str(last_checkpoint(self.out, stage.name)) if stage.kind == "train" else None,
                "examples_grid": grid}

    def versions(self) -> dict:
        if self._versions is None:
            self._versions = versions()
        return self._versions
