"""The report of a reproduction: ``OUT/results.json`` (machine-readable), ``OUT/results.md`` (every row of the
papers' tables with the published number, the suite's number and whether the claim holds, the figures, the time
per stage) and ``OUT/figures/*.png``. Built from the ``stage.json`` files alone; missing stages are "not run"."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from common.files import read_json, write_json_atomic
from pipeline import claims, figures
from pipeline.runner import REPRODUCTION_JSON, STAGE_JSON, versions
from pipeline.stages import Stage, seed_of


def load_records(out: Path, stages: Sequence[Stage]) -> dict[str, dict | None]:
    """Each stage's stage.json (None if it has not finished)."""
    return {s.name: read_json(out / s.name / STAGE_JSON) for s in stages}


def fmt(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "not run"
    if percent:
        return f"{100 * value:.1f}%"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"  # counts (e.g. 16,130 relabelled images), not 1.61e+04
    return f"{value:.3g}"


def verdict(row: dict) -> str:
    if row["claim"] is None:
        return ""
    return {True: "yes", False: "**no**", None: "not run"}[row["holds"]]


REHEARSAL_BANNER = ("**This is a rehearsal**: the paper preset's graph, networks, losses, threat models, optimisers "
                    "and precision at reduced sizes (pipeline/presets.py, REHEARSAL_*), run to prove that every "
                    "stage works. Its numbers say nothing about the papers' claims.")


def markdown(preset: str, reproduction: str | None, records: dict[str, dict | None], rows: list[dict],
             made: dict[str, Path], out: Path, rehearsal: bool = False) -> str:
    done = [n for n, r in records.items() if r]
    held = [r["holds"] for r in rows if r["claim"]]
    lines = [
        f"# Reproduction `{reproduction or '?'}` (preset `{preset}`)", "",
        *([REHEARSAL_BANNER, ""] if rehearsal else []),
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from the `stage.json` files in `{out}`: "
        f"{len(done)} of {len(records)} stages finished. Claims: {held.count(True)} hold, "
        f"{held.count(False)} do not, {held.count(None)} not run. Paper numbers are the published ones; "
        "suite numbers are measured by this run (fractions of the real CIFAR-10 test set unless stated).", "",
    ]
    for section in dict.fromkeys(r["section"] for r in rows):
        lines += [f"## {section}", "", "| experiment | paper | suite | claim | holds |", "|---|---|---|---|---|"]
        lines += [f"| {r['experiment']} | {r['paper']} | {fmt(r['suite'], r['percent'])} | {r['claim'] or ''} | "
                  f"{verdict(r)} |" for r in rows if r["section"] == section]
        lines.append("")
    if imported := {n: r["imported"] for n, r in records.items() if r and r.get("imported")}:
        lines += ["## Imported models", "", "These stages tested a model given with `--use` instead of training "
                  "their own; every stage downstream of them used it.", "",
                  "| stage | file | format | network | sha256 |", "|---|---|---|---|---|"]
        lines += [f"| {n} | `{i['file']}` | {i['format']} | {i['network']['arch']} | `{i['sha256']}` |"
                  for n, i in imported.items()]
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"![{name}]({path.relative_to(out)})" for name, path in made.items()] or ["(no stage has run yet)"]
    lines += ["", "## Time per stage (minutes)", "",
              "| stage | status | fit | tests | measure | total | resumed | precision |",
              "|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for name, record in records.items():
        if not record:
            lines.append(f"| {name} | not run | | | | | | |")
            continue
        t = record.get("timings", {})
        tests = [v for k, v in t.items() if k.startswith("test")]
        total += t.get("total", 0.0)
        cells = [t.get("fit"), sum(tests) if tests else None, t.get("measure"), t.get("total")]
        precision = (record.get("numerics") or {}).get("precision", "")  # train stages: what auto resolved to
        lines.append(f"| {name} | done | " + " | ".join("" if c is None else f"{c / 60:.1f}" for c in cells)
                     + f" | {'yes' if record.get('resumed') else ''} | {precision} |")
    lines += [f"| **all** | | | | | **{total / 60:.1f}** | | |", ""]
    return "\n".join(lines)


def write_report(out: str | Path, stages: Sequence[Stage], preset: str, rehearsal: bool = False) -> dict[str, Path]:
    """Write results.json, results.md and the figures from what has finished in ``out``; their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(out, stages)
    rows = claims.evaluate(records, graph=[s.name for s in stages])
    made = figures.write_figures(records, out / "figures")
    reproduction = (read_json(out / REPRODUCTION_JSON) or {}).get("id")
    summary = {
        "preset": preset, "rehearsal": rehearsal, "reproduction": reproduction,
        "generated": datetime.now(timezone.utc).isoformat(),
        "report_versions": versions(),
        "stages": {s.name: {"status": "done", **records[s.name]} if records[s.name] else
                   {"status": "not run", "config": s.config, "overrides": list(s.overrides), "seed": seed_of(s)}
                   for s in stages},
        "claims": rows,
        "figures": {name: str(path.relative_to(out)) for name, path in made.items()},
    }
    write_json_atomic(out / "results.json", json.loads(json.dumps(summary, default=str)))
    md = out / "results.md"
    md.with_name("results.md.tmp").write_text(markdown(preset, reproduction, records, rows, made, out, rehearsal))
    md.with_name("results.md.tmp").replace(md)
    return {"results.json": out / "results.json", "results.md": md, **made}
