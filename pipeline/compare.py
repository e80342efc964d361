"""Two reproductions side by side: every number of their reports and of their stages' results, field by field.

    python -m pipeline.compare OUT_A OUT_B                  # exit 0 when every shared number is equal
    python -m pipeline.compare OUT_A OUT_B --tolerance 0.02 # equal within 0.02 (e.g. fp32 against bf16)
    python -m pipeline.compare OUT_A OUT_B --table          # the report's rows with both columns (markdown)

What is compared: each report row's number (``results.json``, by row id) and every number in each stage's
``results`` (``<stage>/stage.json``: test metrics and sweeps, measure outputs), flattened into paths such as
``standard/test/metrics/test/acc``. Timings, paths, keys and versions are not results and are left out. Rows and
fields that only one side has are listed, not counted as differences; ``--rename OLD=NEW`` maps a row id of A
that B names otherwise; ``--rows-by text`` keys rows by their display text instead, for reports written before
rows had ids.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.files import read_json

RESULTS_JSON, STAGE_JSON = "results.json", "stage.json"
# Leaves of a stage's results that describe the run, not its outcome: they differ between any two runs.
NOT_RESULTS = frozenset({"seconds", "path", "checkpoint"})


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Nested dicts and lists as ``{"a/b/0/c": leaf}``."""
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, object] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}/{key}" if prefix else str(key)))
    return out


def numbers(out: Path, rename: Mapping[str, str] = {}, rows_by: str = "id") -> dict[str, object]:
    """Every result of the reproduction in ``out``: ``row:<id>`` (or ``row:<display text>`` with
    ``rows_by="text"``) for the report's rows, ``<stage>/...`` for the stages' results."""
    report = read_json(out / RESULTS_JSON)
    if report is None:
        raise SystemExit(f"{out} holds no {RESULTS_JSON}: pass the --out folder of a finished `reproduce`")
    field_name = {"id": "id", "text": "experiment"}[rows_by]
    if any(field_name not in r for r in report["claims"]):
        raise SystemExit(f"{out / RESULTS_JSON}: its rows have no {field_name!r} (a report of an older version): "
                         "pass --rows-by text")
    found = {f"row:{rename.get(r[field_name], r[field_name])}": r["suite"] for r in report["claims"]}
    for stage_json in sorted(out.glob(f"*/{STAGE_JSON}")):
        record = read_json(stage_json) or {}
        found.update((key, value) for key, value in flatten(record.get("results") or {}, stage_json.parent.name).items()
                     if key.rsplit("/", 1)[-1] not in NOT_RESULTS)
    return found


def same(a: object, b: object, tolerance: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int | float) or not isinstance(b, int | float):
        return a == b
    if math.isnan(a) and math.isnan(b):
        return True
    return a == b if tolerance == 0 else abs(a - b) <= tolerance


@dataclass
class Comparison:
    compared: int = 0
    differ: list[tuple[str, object, object]] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)


def compare(a: Mapping[str, object], b: Mapping[str, object], tolerance: float = 0.0) -> Comparison:
    """Field-by-field comparison of two :func:`numbers` maps."""
    result = Comparison(only_a=sorted(set(a) - set(b)), only_b=sorted(set(b) - set(a)))
    for key in sorted(set(a) & set(b)):
        result.compared += 1
        if not same(a[key], b[key], tolerance):
            result.differ.append((key, a[key], b[key]))
    return result


def table(out_a: Path, out_b: Path, labels: Sequence[str]) -> str:
    """The report's rows with both reproductions' numbers (markdown); rows of either side, A's order first."""
    rows_a, rows_b = ({r["id"]: r for r in (read_json(o / RESULTS_JSON) or {"claims": []})["claims"]}
                      for o in (out_a, out_b))

    def shown(row: dict | None) -> str:
        if row is None or row["suite"] is None:
            return "—"
        value = f"{100 * row['suite']:.1f}%" if row["percent"] else f"{row['suite']:.4g}"
        return value + {True: " ✓", False: " ✗"}.get(row["holds"], "")

    lines = [f"| row | paper | {labels[0]} | {labels[1]} |", "|---|---|---|---|"]
    for row_id in [*rows_a, *(i for i in rows_b if i not in rows_a)]:
        row = rows_a.get(row_id) or rows_b[row_id]
        lines.append(f"| {row['experiment']} | {row['paper']} | {shown(rows_a.get(row_id))} | "
                     f"{shown(rows_b.get(row_id))} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_a", type=Path)
    p.add_argument("out_b", type=Path)
    p.add_argument("--tolerance", type=float, default=0.0, help="largest absolute difference counted as equal")
    p.add_argument("--rename", nargs="*", default=[], metavar="OLD=NEW", help="row ids of A that B names otherwise")
    p.add_argument("--rows-by", choices=("id", "text"), default="id",
                   help="key the report's rows by id (default) or by display text (reports without ids)")
    p.add_argument("--table", action="store_true", help="print the report's rows with both columns instead")
    p.add_argument("--labels", nargs=2, default=["A", "B"], help="column names of --table")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.out_a, args.out_b, args.labels))
        return 0
    rename = dict(pair.split("=", 1) for pair in args.rename)
    result = compare(numbers(args.out_a, rename, args.rows_by), numbers(args.out_b, rows_by=args.rows_by),
                     args.tolerance)
    within = f" within {args.tolerance}" if args.tolerance else ""
    print(f"{result.compared} numbers in both: {result.compared - len(result.differ)} equal{within}, "
          f"{len(result.differ)} differ")
    for key, a, b in result.differ:
        print(f"  differs: {key}: {a!r} != {b!r}")
    for side, keys in (("A", result.only_a), ("B", result.only_b)):
        if keys:
            print(f"only in {side} ({len(keys)}): " + ", ".join(keys))
    return 1 if result.differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
