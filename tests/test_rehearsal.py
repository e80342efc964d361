"""The paper preset rehearsed end to end on CPU (``reproduce --preset paper --rehearse``): every stage of the
GPU graph runs (ResNet-50, the ResNet-18 target and ensemble, VGG-16, squares) at reduced sizes on real
CIFAR-10, and the report computes every row. Slow (see the README's slow-test command)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.cli import main as reproduce
from pipeline.presets import preset


@pytest.mark.slow
def test_the_paper_preset_rehearses_end_to_end_with_every_row_computed(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("BOF_DATA_DIR", str(data_dir))
    out = Path(os.environ.get("BOF_REHEARSAL_OUT", tmp_path / "rehearsal"))  # set it to keep the report
    jobs = str(min(2, os.cpu_count() or 1))  # independent stages side by side, a core each (runner.machine_slices)
    records = reproduce(["--preset", "paper", "--rehearse", "--out", str(out), "--jobs", jobs])
    assert set(records) == {s.name for s in preset("paper")}
    summary = json.loads((out / "results.json").read_text())
    assert summary["rehearsal"] is True and summary["preset"] == "paper-rehearsal"
    assert all(stage["status"] == "done" for stage in summary["stages"].values())
    not_computed = [row["id"] for row in summary["claims"] if row["suite"] is None]
    assert not_computed == [], not_computed  # a claim may fail at these sizes; "not run" may not appear
    assert [row["id"] for row in summary["claims"] if row["claim"] and row["holds"] is None] == []
    assert "**This is a rehearsal**" in (out / "results.md").read_text()
