"""What a running stage is doing, for ``reproduce`` to show: one small JSON file per stage.

``reproduce`` sets ``BOF_PROGRESS_FILE`` to ``OUT/<stage>/progress.json`` for every command of a stage; long
loops (a fit's batches, a generation's batches, an attack sweep's points, a measure's examples) call
:func:`report`, which rewrites that file atomically at most once per ``BOF_PROGRESS_INTERVAL`` seconds (default
2) and does nothing when the variable is unset (a run started by hand). The reader is pipeline/progress.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

PROGRESS_FILE_ENV, INTERVAL_ENV = "BOF_PROGRESS_FILE", "BOF_PROGRESS_INTERVAL"
PROGRESS_JSON = "progress.json"
_last_write: dict[str, float] = {}


def report(task: str, done: int, total: int | None, unit: str, *, force: bool = False, **detail: object) -> None:
    """Record that ``task`` (e.g. "fit epoch 3/8", "generation") has done ``done`` of ``total`` ``unit``."""
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return
    now = time.monotonic()
    interval = float(os.environ.get(INTERVAL_ENV, "2"))
    finished = total is not None and done >= total
    if not (force or finished) and now - _last_write.get(task, -1e9) < interval:
        return
    _last_write[task] = now
    entry = {"task": task, "done": done, "total": total, "unit": unit, "time": time.time(), **detail}
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(entry))
        tmp.replace(target)  # a reader sees the old entry or the new one, never half of one
    except OSError:  # progress is a courtesy: never fail a run for it
        tmp.unlink(missing_ok=True)


def read(directory: Path) -> dict | None:
    """The last progress entry written in ``directory`` (None if there is none or it is unreadable)."""
    try:
        return json.loads((Path(directory) / PROGRESS_JSON).read_text())
    except (OSError, ValueError):
        return None
