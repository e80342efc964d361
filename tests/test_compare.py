"""pipeline/compare.py: two reproductions' numbers, field by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import compare


def reproduction(out: Path, acc: float, extra_row: bool = False, row_id: str = "standard.clean") -> Path:
    rows = [{"id": row_id, "experiment": "standard: clean test acc", "paper": "95.3%", "suite": acc,
             "percent": True, "holds": acc > 0.3, "claim": "c", "section": "1"}]
    if extra_row:
        rows.append({"id": "wallace_errors.examples", "experiment": "errors", "paper": "18,768", "suite": 460,
                     "percent": False, "holds": None, "claim": None, "section": "5.3"})
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"claims": rows}))
    (out / "standard").mkdir()
    results = {"test": {"metrics": {"test/acc": acc}, "sweep": [{"norm": "l2", "eps": 0.25, "robust_acc": 0.01}]}}
    (out / "standard" / "stage.json").write_text(json.dumps({"results": results, "timings": {"total": acc * 100}}))
    return out


def test_equal_reproductions_compare_equal_and_timings_are_not_results(tmp_path, capsys):
    a, b = reproduction(tmp_path / "a", 0.876), reproduction(tmp_path / "b", 0.876)
    assert compare.main([str(a), str(b)]) == 0
    assert "5 numbers in both: 5 equal, 0 differ" in capsys.readouterr().out  # row, acc, sweep point (3 fields)


def test_a_differing_number_is_named_and_fails_unless_within_the_tolerance(tmp_path, capsys):
    a, b = reproduction(tmp_path / "a", 0.876), reproduction(tmp_path / "b", 0.871, extra_row=True)
    assert compare.main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "differs: standard/test/metrics/test/acc: 0.876 != 0.871" in out and "differs: row:standard.clean" in out
    assert "only in B (1): row:wallace_errors.examples" in out
    assert compare.main([str(a), str(b), "--tolerance", "0.01"]) == 0


def test_renamed_rows_are_matched_and_the_table_shows_both_columns(tmp_path, capsys):
    a = reproduction(tmp_path / "a", 0.876, row_id="old.clean")
    b = reproduction(tmp_path / "b", 0.876, extra_row=True)
    assert compare.main([str(a), str(b), "--rename", "old.clean=standard.clean"]) == 0
    capsys.readouterr()
    compare.main([str(a), str(b), "--table", "--labels", "fp32", "bf16"])
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| row | paper | fp32 | bf16 |"
    assert "| standard: clean test acc | 95.3% | 87.6% ✓ | — |" in table  # B names the row otherwise
    assert "| errors | 18,768 | — | 460 |" in table


def test_reports_without_row_ids_compare_by_text_and_paths_and_seconds_are_not_results(tmp_path, capsys):
    a, b = reproduction(tmp_path / "a", 0.876), reproduction(tmp_path / "b", 0.876)
    report = json.loads((a / "results.json").read_text())
    del report["claims"][0]["id"]  # a report written before rows had ids
    (a / "results.json").write_text(json.dumps(report))
    for out, seconds in ((a, 7.1), (b, 8.9)):  # run descriptions inside results differ between any two runs
        record = json.loads((out / "standard" / "stage.json").read_text())
        record["results"]["test"].update(seconds=seconds, trained={"path": str(out / "last.ckpt")})
        (out / "standard" / "stage.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match=r"its rows have no 'id'.*pass --rows-by text"):
        compare.main([str(a), str(b)])
    assert compare.main([str(a), str(b), "--rows-by", "text"]) == 0
    assert "5 numbers in both: 5 equal, 0 differ" in capsys.readouterr().out
