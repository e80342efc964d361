"""Progress of a reproduction: stages report what they do (common/progress.py), reproduce shows it while it runs
and ``reproduce --status`` shows it from the files (pipeline/progress.py)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

import train
from common import progress
from common.files import FileLock
from pipeline.presets import preset
from pipeline.progress import Estimate, Watcher, picture, running_here, wall_clock
from pipeline.stages import train_stage


def test_report_writes_only_for_reproduce_and_at_most_once_per_interval(tmp_path, monkeypatch):
    target = tmp_path / "progress.json"
    monkeypatch.delenv(progress.PROGRESS_FILE_ENV, raising=False)
    progress.report("fit epoch 1/2", 1, 10, "batches")
    assert not target.exists()  # a run started by hand writes nothing
    monkeypatch.setenv(progress.PROGRESS_FILE_ENV, str(target))
    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")
    progress.report("generation", 1, 10, "batches", dataset="relabel-1")
    progress.report("generation", 2, 10, "batches")  # within the interval: skipped
    assert progress.read(tmp_path)["done"] == 1 and progress.read(tmp_path)["dataset"] == "relabel-1"
    progress.report("generation", 10, 10, "batches")  # the end of a loop is always written
    assert progress.read(tmp_path)["done"] == 10
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]  # no temporary file left behind


def write_stage(out, name, *, finished: bool, progress_entry: dict | None = None) -> None:
    folder = out / name
    folder.mkdir(parents=True)
    started = datetime.now(timezone.utc).isoformat()
    (folder / "attempt.json").write_text(json.dumps({"key": "k", "started": started}))
    if finished:
        (folder / "stage.json").write_text(json.dumps({"started": started, "timings": {"total": 90.0}}))
    if progress_entry:
        (folder / "progress.json").write_text(json.dumps(progress_entry))


@pytest.fixture
def out(tmp_path):
    out = tmp_path / "out"
    write_stage(out, "a", finished=True)
    write_stage(out, "b", finished=False, progress_entry={"task": "generation", "done": 30, "total": 120,
                                                            "unit": "batches"})
    (out / "reproduction.json").write_text(json.dumps({"id": "tiny-1", "preset": "tiny"}))
    return out


STAGES = [train_stage(n, f"{n}.yaml") for n in ("a", "b", "c")]


def test_the_picture_tells_done_interrupted_and_waiting_stages_from_the_files(out):
    lines = picture(out, STAGES)
    assert lines[0].split()[1:4] == ["a", "done", "1.5"]
    assert "b" in lines[1] and "interrupted" in lines[1] and "generation: 30/120 batches (25%)" in lines[1]
    assert lines[2].split()[1:3] == ["c", "waiting"]
    assert lines[-1].startswith("1 of 3 stages done") and lines[-1].endswith("the reproduction is not running")


def test_a_held_lock_makes_the_unfinished_stage_running_and_the_watcher_reports_changes_once(out):
    lock = FileLock(out / "reproduce.lock")
    assert lock.acquire(blocking=False)
    try:
        assert running_here(out)
        assert "running" in picture(out, STAGES)[1]
        shown: list[str] = []
        watcher = Watcher(out, STAGES, echo=shown.append, every_s=3600)
        watcher.tick()
        watcher.tick()  # nothing changed: nothing printed
        assert len(shown) == 1 and shown[0].startswith("[2/3] b: generation: 30/120 batches (25%)")
        (out / "b" / "progress.json").write_text(json.dumps({"task": "fit epoch 1/8", "done": 5, "total": 98,
                                                             "unit": "batches"}))
        watcher.tick()
        assert len(shown) == 2 and "fit epoch 1/8: 5/98 batches" in shown[1]
    finally:
        lock.release()
    assert not running_here(out)


def test_status_reads_the_preset_from_the_folder_and_refuses_an_empty_one(tmp_path, capsys):
    out = tmp_path / "tiny"
    write_stage(out, "standard", finished=True)
    (out / "reproduction.json").write_text(json.dumps({"id": "tiny-1", "preset": "tiny"}))
    train.main(["reproduce", "--status", "--out", str(out)])
    printed = capsys.readouterr().out
    stages = len(preset("tiny"))
    assert "reproduction tiny-1 (preset tiny)" in printed and f"[1/{stages}] standard" in printed
    assert f"1 of {stages} stages done" in printed and "left" in printed  # an estimate from the finished stage's rate
    with pytest.raises(SystemExit):
        train.main(["reproduce", "--status", "--out", str(tmp_path / "nothing")])
    assert "holds no reproduction" in capsys.readouterr().err


# A reproduction of one fake stage, watched as a user sees it: the command reports 5 steps 0.4 s apart.
WATCHED_RUN = r"""
import os, sys, time
from pathlib import Path
import pipeline.progress
from common import progress
from pipeline.runner import Runner
from pipeline.stages import train_stage

pipeline.progress.PLAIN_EVERY_S = 0.3  # the plain lines' interval, shortened for the test (default: a minute)
out = Path(sys.argv[1])
config = out.parent / "a.yaml"
config.write_text("seed_everything: 0\n")

def execute(argv, log, env):
    os.environ[progress.PROGRESS_FILE_ENV] = env[progress.PROGRESS_FILE_ENV]
    for step in range(1, 6):
        progress.report("fit epoch 1/1", step, 5, "batches", force=True)
        time.sleep(0.4)
    checkpoints = Path(argv[argv.index("--run_dir") + 1]) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "last.ckpt").write_bytes(b"weights")
    return 0

Runner([train_stage("a", str(config), tests=())], out, preset="watched", execute=execute, preflight=None,
       watch=True).run()
"""


def watched(tmp_path, through: str) -> str:
    """The run's output through a pseudo-terminal (as in a terminal) or a pipe (as into a log)."""
    import os
    import pty
    import subprocess
    import sys

    from helpers import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm", "COLUMNS": "160"}
    argv = [sys.executable, "-c", WATCHED_RUN, str(tmp_path / "out")]
    if through == "pipe":
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    main, follower = pty.openpty()
    child = subprocess.Popen(argv, env=env, stdout=follower, stderr=follower, stdin=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal closed: the child has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert child.wait(timeout=60) == 0
    return b"".join(chunks).decode(errors="replace")


def test_on_a_terminal_the_whole_picture_is_redrawn_in_place(tmp_path):
    shown = watched(tmp_path, "pty")
    assert "\x1b[" in shown  # cursor control: the picture is redrawn, not appended
    assert "[1/1] a" in shown and "running" in shown and "fit epoch 1/1: " in shown and "batches" in shown
    assert "stages done" in shown  # the summary line of the picture
    final = shown.rsplit("[1/1] a", 1)[1]
    assert "done" in final.split("\n")[0]  # the last picture left on screen: the stage done
    assert "run (not run yet)" in shown  # the runner's own lines still appear


def test_into_a_pipe_plain_lines_only_when_something_changed(tmp_path):
    shown = watched(tmp_path, "pipe")
    assert "\x1b" not in shown  # no escape codes in a log
    lines = shown.splitlines()
    progress_lines = [line for line in lines if line.startswith("[1/1] a: fit epoch")]
    assert 1 <= len(progress_lines) <= 5, lines  # at most one per change (5 steps), not one per redraw
    assert len(set(progress_lines)) == len(progress_lines)
    assert len(lines) <= 10, lines  # never a flood


def test_time_left_is_wall_clock_on_the_jobs_slots_and_waits_for_inputs():
    # a -> c, b -> d: two chains; on one slot the sum, on two the longer chain, never before an input is done
    deps = {"c": ("a",), "d": ("b",), "e": ("c", "d")}
    work = {"a": 10.0, "b": 4.0, "c": 5.0, "d": 1.0, "e": 2.0}
    assert wall_clock(work, [], deps, 1) == pytest.approx(22.0)
    assert wall_clock(work, [], deps, 2) == pytest.approx(17.0)  # a, c then e: 10 + 5 + 2
    # b, d, then the slot waits: d starts at 4 when b is done, not after c
    assert wall_clock({"a": 10.0, "b": 4.0, "c": 5.0, "d": 8.0}, [], deps, 2) == pytest.approx(15.0)
    assert wall_clock(work, [], deps, 8) == pytest.approx(17.0)  # more slots cannot beat the critical path
    assert wall_clock({"a": 3.0, "c": 5.0}, ["a"], deps, 2) == pytest.approx(8.0)  # c waits for the running a
    # more running than slots (a run with more --jobs): nothing else starts before one of them ends
    assert wall_clock({"a": 3.0, "b": 4.0, "x": 1.0, "y": 1.0}, ["a", "b"], deps, 1) == pytest.approx(6.0)


def test_the_estimate_of_a_two_job_run_is_its_longest_chain(tmp_path):
    stages = [train_stage("a", "configs/mini/standard.yaml"), train_stage("b", "configs/mini/standard.yaml"),
              train_stage("c", "configs/mini/d_det.yaml", deps=["a"])]
    states = [{"name": "a", "state": "done", "seconds": 100.0}, {"name": "b", "state": "running", "seconds": 20.0},
              {"name": "c", "state": "waiting", "seconds": None}]
    one, two = Estimate(stages, tmp_path, []), Estimate(stages, tmp_path, [], jobs=2)
    for estimate in (one, two):
        estimate.flops = {"a": 1e12, "b": 1e12, "c": 2e12}  # 1e10 FLOP/s: a took 100 s
    assert one.seconds_left(states)[0] == pytest.approx(80.0 + 200.0)
    left, basis = two.seconds_left(states)
    assert left == pytest.approx(200.0) and "2 stages at a time" in basis
