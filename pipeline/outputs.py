"""Reading what a finished run wrote: test metrics (the CSV logger's metrics.csv), the attack sweep
(``robust_accuracy.json`` of the RobustAccuracy callback), ``squares.json``, and the record of the constructed
dataset a fit trained on (``constructed.json`` of the ConstructedDataModule: cache key, statistics, example grid)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

CONSTRUCTED_JSON = "constructed.json"  # written by ConstructedDataModule into the fit's run directory


class MissingOutputs(RuntimeError):
    """A run finished but did not write what the pipeline reads."""


def newest(run_dir: Path, name: str) -> Path | None:
    """The most recently written file called ``name`` under ``run_dir`` (a logger makes version_N folders)."""
    found = sorted(run_dir.rglob(name), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def csv_test_metrics(path: Path) -> dict[str, float]:
    """The ``test/...`` columns of a CSV logger's metrics.csv (the last value of each)."""
    metrics: dict[str, float] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            metrics.update({k: float(v) for k, v in row.items() if k and k.startswith("test/") and v})
    return metrics


def read_test_run(run_dir: Path) -> dict:
    """``{"metrics": {test/...: value}, "sweep": [{norm, eps, robust_acc}], "squares": {...}}`` of one
    ``train.py test`` run directory (sweep / squares only when the callbacks wrote them)."""
    result: dict = {"metrics": {}}
    if (metrics := newest(run_dir, "metrics.csv")) is not None:
        result["metrics"] = csv_test_metrics(metrics)
    if (sweep := newest(run_dir, "robust_accuracy.json")) is not None:
        result["sweep"] = json.loads(sweep.read_text())["rows"]
    if (squares := newest(run_dir, "squares.json")) is not None:
        result["squares"] = json.loads(squares.read_text())
    if not result["metrics"] and "sweep" not in result:
        raise MissingOutputs(f"the test run in {run_dir} wrote no metrics.csv with test/ metrics and no "
                             "robust_accuracy.json: give its config a pytorch_lightning.loggers.CSVLogger")
    return result


def constructed_record(run_dir: Path) -> dict | None:
    """The record of the constructed dataset the fit in ``run_dir`` trained on (``run_dir/constructed.json``,
    written atomically); None when there is none (the fit used no constructed dataset)."""
    path = Path(run_dir) / CONSTRUCTED_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def constructed_grid(run_dir: Path) -> str | None:
    """The example grid of the constructed dataset the fit in ``run_dir`` trained on, if the grid is there."""
    record = constructed_record(run_dir)
    grid = record.get("grid") if record is not None else None
    return grid if grid is not None and Path(grid).is_file() else None
