"""The reproduction pipeline: stage keys, caching, --force, failures, resume, the report, and real train.py
stages (``--run_dir``) through the runner on a tiny real CIFAR-10 subset."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from common import progress
from lightning_modules.cli import redirect_outputs
from pipeline import claims
from pipeline.presets import preset
from pipeline.report import write_report
from pipeline.runner import ATTEMPT_JSON, LOG, STAGE_JSON, PipelineError, Runner, StageFailed
from pipeline.stages import (
    TEST_AND_SHIFTED,
    Stage,
    Test,
    ckpt_list,
    commands,
    measure_stage,
    resolve,
    stage_key,
    train_stage,
)


class FakeRun:
    """Stands in for the subprocess: writes what train.py / pipeline.measure would write, and records calls."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.fail, self.calls = fail or {}, []  # calls: (stage, step, argv, env)

    def __call__(self, argv: list[str], log: Path, env: dict) -> int:
        if "pipeline.measure" in argv:
            out, step = Path(argv[argv.index("--out") + 1]), "measure"
            stage = out.name
        else:
            out = Path(argv[argv.index("--run_dir") + 1])  # OUT/<stage> for fit, OUT/<stage>/<label> for tests
            step, stage = ("fit", out.name) if argv[2] == "fit" else (out.name, out.parent.name)
        self.calls.append((stage, step, argv, env))
        with open(log, "a") as f:
            f.write(f"fake {step} of {stage}\n")
            if stage in self.fail:
                f.write("Traceback (most recent call last):\nValueError: the fake stage broke\n")
                return self.fail[stage]
        if step == "fit":
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            (out / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        elif step == "measure":
            out.mkdir(parents=True, exist_ok=True)
            (out / "measure.json").write_text(json.dumps({"value": 1.0}))
        else:
            version = out / "csv" / "version_0"
            version.mkdir(parents=True)
            (version / "metrics.csv").write_text("epoch,step,test/acc\n0,0,0.5\n")
            (version / "robust_accuracy.json").write_text(json.dumps(
                {"steps": 2, "rows": [{"norm": "l2", "eps": 0.0, "robust_acc": 0.5},
                                      {"norm": "l2", "eps": 0.25, "robust_acc": 0.2}]}))
        return 0

    def stages(self) -> list[str]:
        return list(dict.fromkeys(call[0] for call in self.calls))


@pytest.fixture
def graph(tmp_path):
    """a -> b (D_det-style, two tests) -> c (measure); d independent."""
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(f"seed_everything: 0\n# config {name}\n")
    return [
        train_stage("a", str(tmp_path / "a.yaml")),
        train_stage("b", str(tmp_path / "b.yaml"), "--data.init_args.sources", ckpt_list("a"), deps=["a"],
                    tests=TEST_AND_SHIFTED),
        measure_stage("c", "transfer", "--target", "{ckpt:b}", deps=["b"]),
        train_stage("d", str(tmp_path / "a.yaml"), "--seed_everything", "5"),
    ]


def run(graph, out, **kw) -> tuple[FakeRun, dict]:
    fake = FakeRun(kw.pop("fail", None))
    records = Runner(graph, out, preset="test", execute=fake, preflight=None, echo=lambda _: None, **kw).run()
    return fake, records


# ------------------------------------------------------------------------------------------------ keys


def test_stage_key_changes_with_config_bytes_overrides_and_upstream_only(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  max_epochs: 10\n")
    stage = train_stage("s", str(config), "--seed_everything", "1", deps=["up"])

    def key(s=stage, ids=None, preset="mini"):
        return stage_key(s, preset=preset, dep_ids=ids or {"up": "run-1"})

    first = key()
    (tmp_path / "unrelated.yaml").write_text("x: 1\n")
    assert key() == first  # deterministic, and blind to other files
    config.write_text("trainer:\n  max_epochs: 11\n")
    assert key() != first
    config.write_text("trainer:\n  max_epochs: 10\n")
    assert key() == first
    assert key(train_stage("s", str(config), "--seed_everything", "2", deps=["up"])) != first
    assert key(ids={"up": "run-2"}) != first
    assert key(preset="paper") != first


def test_every_preset_is_a_valid_graph():
    for name in ("quick", "mini", "paper", "tiny"):
        stages = preset(name)
        assert stages[0].name == "standard"
    members = [s.name for s in preset("paper") if s.name.startswith("ensemble_seed_")]
    assert len(members) == 10
    mini = {s.name: s for s in preset("mini")}  # Nakkiran's models: the fast CNN without whitening, own stages
    assert mini["nakkiran_ddet_l2"].deps == ("standard_nowhiten", "ensemble_seed_1", "ensemble_seed_2",
                                             "ensemble_seed_3")
    assert mini["pgd_ddet_linf"].deps == ("standard_nowhiten",) and mini["transfer"].deps[-1] == "fresh_nowhiten"
    family = "configs/mini/nakkiran_model.yaml"
    assert all(family in mini[m].overrides for m in ("standard_nowhiten", "ensemble_seed_2", "fresh_nowhiten"))
    assert family not in mini["fresh"].overrides and mini["figure3"].deps[:3] == ("standard", "d_det", "fresh")
    paper = {s.name: s for s in preset("paper")}  # Nakkiran's models are ResNet-18s, Ilyas's ResNet-50s
    assert paper["nakkiran_ddet_l2"].deps[0] == "standard_resnet18" and "resnet18" in paper["ensemble_seed_1"].overrides
    assert paper["transfer"].deps[-1] == "fresh_resnet18" and "resnet18" not in paper["fresh"].overrides


def test_quick_is_mini_stages_with_smaller_sizes_only(tmp_path):
    """Smaller than mini by sizes and epochs only: each quick stage is mini's stage of that name (same config,
    same base, same tests) with size arguments appended, so its key differs and a mini run never reuses it."""
    from pipeline.presets import QUICK

    quick, mini = preset("quick"), {s.name: s for s in preset("mini")}
    assert [s.name for s in quick] == ["standard", "standard_nowhiten", "ensemble_seed_1", "ensemble_seed_2",
                                       "d_det", "nakkiran_ddet_l2"]
    sizes = {"--trainer.max_epochs", "--data.init_args.train_size"}
    for stage in quick:
        same = mini[stage.name]
        assert (stage.config, stage.base, stage.tests) == (same.config, same.base, same.tests), stage.name
        added = stage.overrides[len(same.overrides):] if stage.name != "nakkiran_ddet_l2" else QUICK[stage.name]
        assert set(added[::2]) <= sizes, (stage.name, added)
        assert stage_key(stage, preset="quick", dep_ids={d: "r" for d in stage.deps}) != stage_key(
            same, preset="mini", dep_ids={d: "r" for d in same.deps})
    # Nakkiran's D_det: the mini target and members (2 of its 3), the mini attack config.
    nakkiran = next(s for s in quick if s.name == "nakkiran_ddet_l2")
    assert nakkiran.deps == ("standard_nowhiten", "ensemble_seed_1", "ensemble_seed_2")
    assert nakkiran.config == mini["nakkiran_ddet_l2"].config

    fake = run_preset(quick, tmp_path, "quick")
    assert len(fake.calls) == 6 * 2 + 2  # every stage fits and tests; the two D_det stages also on y + 1
    summary = json.loads((tmp_path / "results.json").read_text())
    assert {row["id"].split(".")[0] for row in summary["claims"]} == {"standard", "d_det", "nakkiran_ddet_l2"}
    assert "| not run |" not in (tmp_path / "results.md").read_text()  # only the rows of what it ran
    with pytest.raises(PipelineError, match="holds a reproduction of preset 'quick'.*--out"):
        Runner(preset("mini"), tmp_path, preset="mini", execute=FakeRun(), preflight=None, echo=lambda _: None).run()


def run_preset(stages, out, name) -> FakeRun:
    """Every stage of ``stages`` through FakeRun, then the report."""
    fake = FakeRun()
    Runner(stages, out, preset=name, execute=fake, preflight=None, echo=lambda _: None).run()
    write_report(out, stages, name)
    return fake


def test_measure_stages_get_the_logger_configs_of_the_stage_arguments(tmp_path):
    stage = measure_stage("transfer", "transfer", "--examples", "5")
    extra = ["--config", "configs/loggers/wandb.yaml", "--trainer.devices", "2"]
    (label, argv), = commands(stage, tmp_path, extra)
    assert label == "measure" and argv[argv.index("--logger_config") + 1] == str(resolve("configs/loggers/wandb.yaml"))
    assert "--trainer.devices" not in argv  # trainer arguments are for train.py only
    (_, plain), = commands(stage, tmp_path)
    assert "--logger_config" not in plain


def test_squares_stage_tests_both_networks_of_one_fit(tmp_path):
    squares = next(s for s in preset("mini") if s.name == "squares")
    assert "squares_1epoch" not in {s.name for s in preset("mini")}  # no second fit of the same weights
    steps = dict(commands(squares, tmp_path))
    assert list(steps) == ["fit", "test", "test_1epoch"]
    assert steps["test"][-1].endswith("squares/checkpoints/last.ckpt")
    assert steps["test_1epoch"][-1] == str(tmp_path / "squares" / "checkpoints" / "after_1_epoch.ckpt")
    # Which weights a test reads enters the key; the default keeps the keys of stages that never set it.
    plain = Stage("squares", squares.config, squares.overrides, base=squares.base)
    assert stage_key(plain, preset="mini", dep_ids={}) != stage_key(squares, preset="mini", dep_ids={})
    assert stage_key(plain, preset="mini", dep_ids={}) == stage_key(
        Stage("squares", squares.config, squares.overrides, tests=(Test("test", checkpoint="last.ckpt"),),
              base=squares.base),
        preset="mini", dep_ids={})


# ---------------------------------------------------------------------------------- caching and --force


def test_finished_pipeline_reruns_as_a_noop(graph, tmp_path):
    fake, first = run(graph, tmp_path / "out")
    assert fake.stages() == ["a", "b", "c", "d"]
    assert [c[1] for c in fake.calls if c[0] == "b"] == ["fit", "test", "test_shift1"]
    assert first["b"]["results"]["test_shift1"]["metrics"]["test/acc"] == 0.5
    again, second = run(graph, tmp_path / "out")
    assert again.calls == []
    assert {k: v["run_id"] for k, v in second.items()} == {k: v["run_id"] for k, v in first.items()}


def test_force_reruns_the_stage_and_its_downstream_stages_only(graph, tmp_path):
    run(graph, tmp_path / "out")
    fake, _ = run(graph, tmp_path / "out", force=["b"])
    assert fake.stages() == ["b", "c"]
    assert run(graph, tmp_path / "out")[0].calls == []  # and the new chain is stable


def test_a_changed_config_reruns_its_stage_and_downstream(graph, tmp_path):
    run(graph, tmp_path / "out")
    with open(tmp_path / "b.yaml", "a") as f:
        f.write("# one more byte\n")
    assert run(graph, tmp_path / "out")[0].stages() == ["b", "c"]


def test_only_runs_the_stage_and_what_it_needs(graph, tmp_path):
    assert run(graph, tmp_path / "out", only=["b"])[0].stages() == ["a", "b"]
    assert run(graph, tmp_path / "out", only=["c"])[0].stages() == ["c"]  # a, b come from the cache


def test_unknown_stage_names_and_missing_configs_are_errors(graph, tmp_path):
    with pytest.raises(PipelineError, match="no such stage.*stages are: a, b, c, d"):
        Runner(graph, tmp_path, preset="test", force=["nope"])
    (tmp_path / "b.yaml").unlink()
    fake = FakeRun()
    with pytest.raises(PipelineError, match=r"stage 'b' needs .*b\.yaml"):
        Runner(graph, tmp_path / "out", preset="test", execute=fake, preflight=None, echo=lambda _: None).run()
    assert fake.calls == []  # nothing starts before every config is there


# --------------------------------------------------------------------------------- failures and resume


def test_a_failing_stage_stops_the_pipeline_naming_stage_code_and_log(graph, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(StageFailed) as failure:
        run(graph, out, fail={"b": 3})
    message = str(failure.value)
    assert "stage 'b' failed" in message and "code 3" in message and str(out / "b" / LOG) in message
    assert "ValueError: the fake stage broke" in message  # the end of the log
    assert (out / "a" / STAGE_JSON).is_file() and not (out / "b" / STAGE_JSON).exists()
    assert not (out / "c").exists() and not (out / "d").exists()  # nothing after the failure


def test_an_unfinished_fit_resumes_from_last_ckpt_and_a_changed_one_restarts(graph, tmp_path):
    out = tmp_path / "out"
    run(graph, out)
    (out / "b" / STAGE_JSON).unlink()  # as if killed after the fit: attempt.json and last.ckpt remain
    fake, records = run(graph, out)
    fit = next(c[2] for c in fake.calls if c[:2] == ("b", "fit"))
    assert fit[-2:] == ["--ckpt_path", "last"] and records["b"]["resumed"]
    assert fake.stages() == ["b", "c"]
    # A changed config must not resume from a checkpoint of the old one.
    (out / "b" / STAGE_JSON).unlink()
    (tmp_path / "b.yaml").write_text("seed_everything: 1\n")
    fake, _ = run(graph, out)
    fit = next(c[2] for c in fake.calls if c[:2] == ("b", "fit"))
    assert "--ckpt_path" not in fit


def test_a_folder_not_made_by_the_pipeline_is_moved_aside_not_deleted(graph, tmp_path):
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "precious.txt").write_text("a run made by hand")
    run(graph, out, only=["a"])
    aside = [p for p in out.iterdir() if p.name.startswith("a.before-")]
    assert len(aside) == 1 and (aside[0] / "precious.txt").read_text() == "a run made by hand"


# ------------------------------------------------------------------------------------ claims and report


def record(results: dict, kind: str = "train", **extra) -> dict:
    return {"kind": kind, "results": results, "timings": {"fit": 60.0, "test": 30.0, "total": 90.0}, **extra}


def scores(acc: float, robust_l2_025: float | None = None) -> dict:
    sweep = [] if robust_l2_025 is None else [{"norm": "l2", "eps": 0.25, "robust_acc": robust_l2_025}]
    return {"metrics": {"test/acc": acc}, "sweep": sweep}


def holds(rows: list[dict], row_id: str) -> bool | None:
    return next(r["holds"] for r in rows if r["id"] == row_id)


def test_claims_evaluate_on_fabricated_results():
    records = {
        "d_det": record({"test": scores(0.437, 0.0), "test_shift1": scores(0.2)}),
        "d_rand": record({"test": scores(0.12, 0.0)}),
        "d_robust": record({"test": scores(0.84, 0.48)}),
        "d_nonrobust": record({"test": scores(0.88, 0.0)}),
        "nakkiran_ddet_l2": record({"test": scores(0.028), "test_shift1": scores(0.708)}),
        "nakkiran_ddet_linf": record({"test": scores(0.30), "test_shift1": scores(0.40)}),
        "transfer": record({"l2": {"pgd_success": 0.999, "pgd_transfer": 0.825, "non_transferable_success": 0.993,
                                   "non_transferable_transfer": 0.017}}, kind="measure"),
    }
    rows = claims.evaluate(records)
    assert holds(rows, "d_det.clean") is True  # 43.7% >= 20%
    assert holds(rows, "d_rand.clean") is False  # 12% is not far above chance
    assert holds(rows, "d_robust.l2_0.25") is True  # 48% >= 3 x 0% and >= 10%
    assert holds(rows, "d_nonrobust.l2_0.25") is True  # 0% < 88% / 2
    assert holds(rows, "nakkiran_ddet_l2.clean") is True  # 2.8% <= 15%
    assert holds(rows, "nakkiran_ddet_l2.shifted") is True  # 70.8% >= 3 x 2.8%
    assert holds(rows, "nakkiran_ddet_linf.clean") is False  # 30% is not near chance
    assert holds(rows, "transfer.l2.pgd_transfer") is True  # 82.5% >= 5 x 1.7%
    assert holds(rows, "transfer.l2.non_transferable_transfer") is True  # 1.7% < 10%
    assert holds(rows, "transfer.linf.pgd_success") is None  # not measured: "not run", not an error
    assert holds(rows, "standard.l2_0.25") is None
    d_r = {**records, "d_nonrobust": record({"test": scores(0.88, 0.2)})}
    assert holds(claims.evaluate(d_r), "d_robust.l2_0.25") is False  # 48% < 3 x 20%
    weak = claims.evaluate({**records, "nakkiran_ddet_l2": record({"test": scores(0.05), "test_shift1": scores(0.3)}),
                            "pgd_ddet_l2": record({"test": scores(0.16)}),
                            "pgd_ddet_linf": record({"test": scores(0.14)})})
    assert holds(weak, "nakkiran_ddet_l2.shifted") is False  # 6x its (X, Y), but < 35%
    assert holds(weak, "pgd_ddet_l2.clean") is True  # the floor: >= 15%
    assert holds(weak, "pgd_ddet_linf.clean") is False


def test_figure3_rows_cover_every_measured_architecture_with_its_paper_point():
    points = [{"label": "D_det (fast_cnn)", "stage": "d_det", "accuracy": 0.3, "transfer": 0.6},
              {"label": "D_det (vgg16)", "stage": "d_det_vgg16", "accuracy": 0.21, "transfer": 0.45}]
    rows = claims.evaluate({"figure3": record({"points": points}, kind="measure")})
    vgg = [r for r in rows if r["id"].startswith("figure3.d_det_vgg16.")]
    assert [(r["paper"], r["suite"]) for r in vgg] == [("VGG-16 28%", 0.21), ("VGG-16 66%", 0.45)]
    assert not [r for r in claims.evaluate({}) if r["id"].startswith("figure3.d_det_")]  # none measured: no rows


def test_rank_correlation():
    assert claims.rank_correlation([(1, 10), (2, 20), (3, 30)]) == pytest.approx(1.0)
    assert claims.rank_correlation([(1, 30), (2, 20), (3, 10)]) == pytest.approx(-1.0)
    assert claims.rank_correlation([(1, 1), (2, 1), (3, 1)]) is None  # constant accuracy: undefined
    assert claims.rank_correlation([(1, 1), (2, 2)]) is None


def test_report_writes_markdown_json_and_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tmp_path / "out"
    grid = tmp_path / "cache" / "examples.png"
    grid.parent.mkdir()
    plt.imsave(grid, [[0.0, 1.0], [1.0, 0.0]])
    sweep = [{"norm": n, "eps": e, "robust_acc": a} for n, e, a in
             (("l2", 0.0, 0.87), ("l2", 0.25, 0.31), ("l2", 0.5, 0.04), ("linf", 0.0, 0.87), ("linf", 8 / 255, 0.0))]
    fabricated = {
        "standard": record({"test": {"metrics": {"test/acc": 0.87}, "sweep": sweep}}),
        "d_det": record({"test": scores(0.437, 0.01), "test_shift1": scores(0.2)},
                        artifacts={"examples_grid": str(grid)}),
        "figure3": record({"points": [{"label": "D_det", "stage": "d_det", "accuracy": 0.437, "transfer": 0.9},
                                      {"label": "N", "stage": "nakkiran_ddet_l2", "accuracy": 0.03, "transfer": 0.02},
                                      {"label": "P", "stage": "pgd_ddet_l2", "accuracy": 0.3, "transfer": 0.6}]},
                          kind="measure"),
    }
    for name, rec in fabricated.items():
        (out / name).mkdir(parents=True)
        (out / name / STAGE_JSON).write_text(json.dumps(rec))
    written = write_report(out, preset("mini"), "mini")

    md = (out / "results.md").read_text()
    assert "| D_det: test acc (true labels) | 43.7% | 43.7% | d_det far above chance (10%): >= 20% | yes |" in md
    assert "| D_R: clean test acc | 84% | not run |" in md  # missing stages are reported, not crashed on
    assert "| rank correlation of (transfer, accuracy) over the measured points | + (on one line) | 1 |" in md
    assert "| d_robust | not run |" in md and "| standard | done | 1.0 | 0.5 |" in md
    summary = json.loads((out / "results.json").read_text())
    assert summary["stages"]["standard"]["status"] == "done"
    assert summary["stages"]["d_robust"] == {"status": "not run", "config": "configs/mini/d_robust.yaml",
                                             "overrides": ["--data.init_args.cache_dir", "{out}/constructed",
                                                           "--data.init_args.sources",
                                                           '["{ckpt:adversarial_l2}"]'], "seed": 0}
    assert {"python", "torch", "pytorch-lightning"} <= set(summary["report_versions"])
    for name in ("accuracy_vs_eps", "figure3", "examples_d_det"):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "figure2" not in written  # Figure 2 is about D_R / D_NR: with neither trained it is not drawn
    assert not list(out.rglob("*.tmp*"))  # every file was renamed into place


def test_dry_run_through_train_py_runs_nothing(tmp_path, capsys):
    train.main(["reproduce", "--preset", "mini", "--out", str(tmp_path / "out"), "--dry-run",
                "--trainer.accelerator", "cpu"])
    printed = capsys.readouterr().out
    assert "standard             run     not run yet" in printed
    assert "d_det                run     an upstream stage reruns" in printed
    assert "--trainer.accelerator cpu --run_dir" in printed and "test_shift1:" in printed
    assert not (tmp_path / "out").exists()


def test_reproduce_refuses_stray_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["reproduce", "--preset", "tiny", "--out", str(tmp_path), "--model.init_args.lr", "1"])
    assert "--stage-args" in capsys.readouterr().err


# ------------------------------------------------------------------------------- real train.py stages


def test_real_stage_end_to_end_with_run_dir_cache_and_resume(tmp_path, data_dir, monkeypatch):
    """The tiny preset's standard stage through the runner: train.py fit + test in subprocesses (~40 s)."""
    monkeypatch.chdir(tmp_path)  # a run that ignored --run_dir would write runs/... here
    monkeypatch.setenv("BOF_DATA_DIR", str(data_dir))
    out = tmp_path / "out"
    stages = preset("tiny")
    records = Runner(stages, out, preset="tiny", only=["standard"], echo=lambda _: None).run()

    result = records["standard"]["results"]["test"]
    assert 0.0 <= result["metrics"]["test/acc"] <= 1.0
    assert [(r["norm"], round(r["eps"], 4)) for r in result["sweep"]] == [
        ("l2", 0.0), ("l2", 0.25), ("linf", 0.0), ("linf", 0.0078)]
    # --run_dir: logs, config and checkpoints of the fit, and the test run, under the stage folder only.
    stage = out / "standard"
    assert (stage / "checkpoints" / "last.ckpt").is_file()
    config = (stage / "csv" / "version_0" / "config.yaml").read_text()
    assert f"run_dir: {stage}" in config and f"dirpath: {stage}/checkpoints" in config
    assert (stage / "csv" / "version_0" / "metrics.csv").is_file() and list(stage.glob("tensorboard/*/events.*"))
    assert (stage / "test" / "csv" / "version_0" / "robust_accuracy.json").is_file()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "lightning_logs").exists()
    assert "--run_dir" in (stage / LOG).read_text()
    # What the stage reported last for the progress view: its test's attack sweep, every point done.
    assert progress.read(stage) | {"time": 0} == {"task": "test accuracy under attack", "done": 4, "total": 4,
                                                 "unit": "points", "time": 0}

    def must_not_run(argv, log, env):
        raise AssertionError(f"a finished stage ran again: {argv}")

    Runner(stages, out, preset="tiny", only=["standard"], execute=must_not_run, echo=lambda _: None).run()

    # Killed before stage.json: the rerun resumes the fit from last.ckpt.
    (stage / STAGE_JSON).unlink()
    assert (stage / ATTEMPT_JSON).is_file()
    fake = FakeRun()
    Runner(stages, out, preset="tiny", only=["standard"], execute=fake, echo=lambda _: None).run()
    fit = fake.calls[0]
    assert fit[:2] == ("standard", "fit") and fit[2][-2:] == ["--ckpt_path", "last"]
    reproduction = json.loads((out / "reproduction.json").read_text())["id"]
    assert fit[3]["WANDB_RUN_GROUP"] == reproduction and fit[3]["WANDB_JOB_TYPE"] == "standard"
    shutil.rmtree(out)


def test_run_dir_redirects_loggers_checkpoints_and_output_dirs():
    from jsonargparse import Namespace

    def component(class_path, **init_args):
        return Namespace(class_path=class_path, init_args=Namespace(**init_args))

    trainer = Namespace(
        default_root_dir="runs/x",
        logger=[component("pytorch_lightning.loggers.CSVLogger", save_dir="runs/x", name="csv"),
                component("lightning_modules.WandbLoggerWithFallback", save_dir="runs", dir=None, project="p")],
        callbacks=[component("pytorch_lightning.callbacks.ModelCheckpoint", dirpath="runs/x/checkpoints"),
                   component("lightning_modules.squares.SquaresRobustness", output_dir="runs/x", eps=0.01),
                   component("pytorch_lightning.callbacks.LearningRateMonitor", logging_interval=None)])
    redirect_outputs(trainer, "/r")
    assert trainer.default_root_dir == "/r"
    assert [lg.init_args.save_dir for lg in trainer.logger] == ["/r", "/r"] and trainer.logger[1].init_args.dir == "/r"
    assert trainer.callbacks[0].init_args.dirpath == "/r/checkpoints"
    assert trainer.callbacks[1].init_args.output_dir == "/r" and trainer.callbacks[1].init_args.eps == 0.01
    bare = Namespace(default_root_dir=None, logger=True, callbacks=None)  # Lightning's defaults
    redirect_outputs(bare, "/r")
    assert bare.default_root_dir == "/r" and bare.logger is True


def test_a_fit_stopped_by_sigterm_exits_143_not_0(tmp_path, data_dir):
    """Lightning ends a SIGTERM'd fit with a bare SystemExit (exit code 0); train.py turns it into 143, so the
    pipeline (or a cluster script) never records an unfinished fit as finished."""
    progress_file = tmp_path / "progress.json"
    env = {**os.environ, "BOF_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", progress.PROGRESS_FILE_ENV:
           str(progress_file), progress.INTERVAL_ENV: "0"}
    fit = subprocess.Popen([sys.executable, "train.py", "fit", "--config", "configs/mini/base.yaml", "--config",
                            "configs/mini/standard.yaml", "--config", "configs/ci/tiny.yaml", "--trainer.max_epochs",
                            "1000", "--run_dir", str(tmp_path / "run")], cwd=Path(__file__).resolve().parents[1],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (progress_file.is_file() and "fit epoch" in progress_file.read_text()):
            assert time.monotonic() < deadline and fit.poll() is None, "the fit never started its epochs"
            time.sleep(0.2)
        fit.send_signal(signal.SIGTERM)
        output, _ = fit.communicate(timeout=120)
    finally:
        fit.kill()
    assert fit.returncode == 143, output[-2000:]
    assert "Received SIGTERM" in output and "exit code 143" in output


def test_a_stage_running_when_another_fails_is_not_recorded_as_finished(graph, tmp_path):
    """The concurrent runner stops the other stages when one fails; a stopped command may still exit 0 (as a
    SIGTERM'd Lightning fit did), and must not make its stage finished."""
    def execute(argv, log, env):
        stage = Path(argv[argv.index("--run_dir") + 1]).name
        if stage == "a":
            time.sleep(0.2)
            return 3
        time.sleep(1.0)  # d: still running when a fails; returns 0 after the stop
        (Path(argv[argv.index("--run_dir") + 1]) / "checkpoints").mkdir(parents=True, exist_ok=True)
        (Path(argv[argv.index("--run_dir") + 1]) / "checkpoints" / "last.ckpt").write_bytes(b"w")
        return 0

    with pytest.raises(StageFailed, match="stage 'a' failed"):
        Runner(graph, tmp_path, preset="test", execute=execute, preflight=None, echo=lambda _: None, jobs=2,
               slices=[{}, {}]).run()
    assert (tmp_path / "d" / ATTEMPT_JSON).is_file() and not (tmp_path / "d" / STAGE_JSON).exists()


def test_stopping_the_pipeline_stops_the_running_stage(tmp_path):
    """``kill PID`` of the pipeline must not leave the stage's fit running (it would write into a stage the next
    run resumes): the runner's command is terminated with it."""
    log = tmp_path / "stage.log"
    stage_command = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"]
    pipeline = subprocess.Popen([sys.executable, "-c", (
        "import os; from pathlib import Path; from pipeline.runner import exit_on_sigterm, run_subprocess\n"
        f"with exit_on_sigterm(): run_subprocess({stage_command!r}, Path({str(log)!r}), dict(os.environ))")],
        cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while not (lines := [x for x in (log.read_text().splitlines() if log.exists() else []) if x.isdigit()]):
        assert time.monotonic() < deadline and pipeline.poll() is None, "the stage command never started"
        time.sleep(0.1)
    stage_pid = int(lines[0])
    pipeline.send_signal(signal.SIGTERM)
    assert pipeline.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # terminated and reaped by the pipeline, not orphaned
        os.kill(stage_pid, 0)


def test_reproduce_restores_the_sigterm_handler_it_installs(tmp_path, monkeypatch):
    """The SIGTERM-to-SystemExit handler is the pipeline's own: it is in place while the stages run, and after
    ``reproduce`` fails (or returns) the caller's handler (a test runner's, a notebook's) is back."""
    before, during = signal.getsignal(signal.SIGTERM), []

    def failing_run(self):
        during.append(signal.getsignal(signal.SIGTERM))
        raise PipelineError("a stage failed")

    monkeypatch.setattr(Runner, "run", failing_run)
    with pytest.raises(SystemExit):
        train.main(["reproduce", "--preset", "tiny", "--out", str(tmp_path), "--no-report"])
    assert during and during[0] is not before
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------------------------- concurrent stages


class SlowFakeRun(FakeRun):
    """A FakeRun whose commands take a moment, recording when each ran and with which environment."""

    def __init__(self, fail: dict[str, int] | None = None, seconds: float = 0.3) -> None:
        super().__init__(fail)
        self.seconds, self.spans, self.lock = seconds, {}, __import__("threading").Lock()

    def __call__(self, argv: list[str], log: Path, env: dict) -> int:
        start = time.monotonic()
        time.sleep(self.seconds)
        with self.lock:
            code = super().__call__(argv, log, env)
            stage, step = self.calls[-1][:2]
            self.spans[(stage, step)] = (start, time.monotonic(), env.get("OMP_NUM_THREADS"))
        return code


def run_jobs(graph, out, jobs: int, **kw):
    fake = SlowFakeRun(kw.pop("fail", None))
    slices = [{"OMP_NUM_THREADS": str(10 + slot)} for slot in range(jobs)]
    records = Runner(graph, out, preset="test", execute=fake, preflight=None, echo=lambda _: None, jobs=jobs,
                     slices=slices).run()
    return fake, records


def test_independent_stages_run_side_by_side_each_on_its_own_slice(graph, tmp_path):
    fake, records = run_jobs(graph, tmp_path / "jobs", 2)
    spans = fake.spans
    # d depends on nothing: it runs while a runs, on the other slice; b starts only after a's fit.
    a, d = spans[("a", "fit")], spans[("d", "fit")]
    assert a[0] < d[1] and d[0] < a[1] and {a[2], d[2]} == {"10", "11"}
    assert spans[("b", "fit")][0] >= spans[("a", "test")][1]
    assert spans[("c", "measure")][0] >= spans[("b", "test_shift1")][1]
    assert sorted(records) == ["a", "b", "c", "d"] and records["d"]["machine_slice"]["OMP_NUM_THREADS"] in ("10", "11")
    # The same graph one stage at a time gives the same records, apart from run ids, times and slices.
    _, sequential = run(graph, tmp_path / "one")
    for name in records:
        assert records[name]["results"] == sequential[name]["results"]
        assert records[name]["key"] != "" and records[name]["overrides"] == sequential[name]["overrides"]
    # A rerun is cached, with jobs as without.
    again, _ = run_jobs(graph, tmp_path / "jobs", 2)
    assert again.calls == []


def test_a_failing_stage_stops_the_concurrent_run_and_what_depends_on_it(graph, tmp_path):
    with pytest.raises(StageFailed, match="stage 'a' failed"):
        run_jobs(graph, tmp_path, 2, fail={"a": 3})
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # never started


def test_machine_slices_split_threads_and_gpus_disjointly():
    from pipeline.runner import machine_slices

    assert machine_slices(2, cpu_threads=2, gpus=0) == [{"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "1"}]
    gpus = [s["CUDA_VISIBLE_DEVICES"] for s in machine_slices(4, cpu_threads=32, gpus=8)]
    assert gpus == ["0,1", "2,3", "4,5", "6,7"]
    with pytest.raises(PipelineError, match="--jobs 10 needs at least 10 GPUs .* this host has 8"):
        machine_slices(10, cpu_threads=32, gpus=8)


def test_figure2_is_drawn_only_when_a_robust_or_non_robust_dataset_was_trained_on(tmp_path):
    from pipeline.figures import write_figures

    trained = {"standard": record({"test": scores(0.87, 0.01)}), "d_det": record({"test": scores(0.44, 0.0)})}
    assert "figure2" not in write_figures(trained, tmp_path / "without")
    drawn = write_figures({**trained, "d_robust": record({"test": scores(0.52, 0.29)})}, tmp_path / "with")
    assert drawn["figure2"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_numbers_show_counts_whole_and_fractions_as_percent():
    from pipeline.report import fmt

    assert (fmt(16130, percent=False), fmt(0.5853), fmt(0.000413, percent=False), fmt(None)) == (
        "16,130", "58.5%", "0.000413", "not run")
