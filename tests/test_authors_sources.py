"""The authors' models and datasets as sources of a reproduction. ``reproduce --use STAGE=FILE``: a model from
outside (a robustness-library checkpoint, or a suite checkpoint) tested in place of the stage's own and used by
every stage downstream, named with its sha256 in the report; unsafe or missing files are refused before anything
runs. ``reproduce --released DIR``: the released datasets trained as the suite trains its own, reported beside
them (synthetic files in the released format here: the real ones cannot be downloaded on this machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, environment, save_released, write_checkpoint
from robustness_library import MARKER, Payload, library_file, resnet18
from safetensors.torch import load_file

from common.files import file_hash
from pipeline.presets import preset
from pipeline.runner import Runner
from pipeline.stages import with_imports


def reproduce(out: Path, data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), "reproduce", "--preset", "tiny", "--out", str(out),
                           *args], cwd=REPO, env=environment(data_dir), capture_output=True, text=True, timeout=600)


def check_imported(out: Path, stage: str, source: Path, kind: str, network: dict) -> None:
    """``stage`` tested the model of ``source`` (as it tests its own), trained nothing, and the report names it."""
    record = json.loads((out / stage / "stage.json").read_text())
    assert "fit" not in record["timings"] and "import" in record["commands"]
    assert record["imported"]["sha256"] == file_hash(source, "sha256")
    assert record["imported"]["format"] == kind and network.items() <= record["imported"]["network"].items()
    test = record["results"]["test"]
    assert 0 <= test["metrics"]["test/acc"] <= 1 and test["sweep"]
    report = (out / "results.md").read_text()
    assert "## Imported models" in report and file_hash(source, "sha256") in report


@pytest.fixture(scope="module")
def authors_run(tmp_path_factory, data_dir) -> dict[str, Path]:
    """One tiny reproduction with both: an imported standard model (a suite checkpoint, e.g. from another machine,
    of another network than the stage's config builds) and a released D_det (12 images in the released format)."""
    tmp = tmp_path_factory.mktemp("authors")
    ours = write_checkpoint(tmp / "standard.ckpt", seed=3, arch_kwargs={"widths": [4, 8, 16]})
    save_released(tmp / "release" / "ddet_CIFAR")
    save_released(tmp / "release" / "d_robust_CIFAR")  # the tiny preset has no D_R stage: not added
    out = tmp / "out"
    result = reproduce(out, data_dir, "--only", "d_det", "released_d_det", "--use", f"standard={ours}",
                       "--released", str(tmp / "release"),
                       "--stage-args", "--data.init_args.train_size 12 --data.init_args.batch_size 4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"out": out, "ours": ours, "tmp": tmp}


def test_an_imported_model_is_tested_in_place_of_the_stage_and_used_downstream(authors_run):
    out, ours = authors_run["out"], authors_run["ours"]
    check_imported(out, "standard", ours, "suite", {"arch": "fast_cnn", "arch_kwargs": {"widths": [4, 8, 16]}})
    (manifest,) = (out / "constructed").glob("*/manifest.json")  # D_det was generated from the imported model
    sources = json.loads(manifest.read_text())["sources"]
    assert [s["sha256"] for s in sources] == [file_hash(out / "standard" / "checkpoints" / "last.ckpt", "sha256")]
    assert load_file(next((out / "constructed").glob("*/shard_00000.safetensors")))

    def plan(standard: Path) -> dict[str, str]:
        stages = with_imports(preset("tiny"), {"standard": standard})
        runner = Runner(stages, out, preset="tiny", only=["d_det"], extra_args=[
            "--data.init_args.train_size", "12", "--data.init_args.batch_size", "4"])
        return {d.stage.name: d.action for d in runner.plan()}

    # The file's sha256 is in the key: the same file is cached, another reruns the stage and what is downstream
    assert plan(ours) == {"standard": "cached", "d_det": "cached"}
    other = write_checkpoint(authors_run["tmp"] / "other.ckpt", seed=4)
    assert plan(other) == {"standard": "run", "d_det": "run"}


def test_released_datasets_are_trained_as_the_suite_trains_its_own_and_reported_beside_them(authors_run,
                                                                                            data_dir):
    out = authors_run["out"]
    record = json.loads((out / "released_d_det" / "stage.json").read_text())
    suite = next(s for s in preset("tiny") if s.name == "d_det")
    assert record["config"] == suite.config and record["deps"] == {}  # the suite's experiment, no source model
    fit = record["commands"]["fit"]
    assert "datamodules.ReleasedDataModule" in fit and "--data.init_args.sources" not in fit
    assert set(record["results"]) == {"test", "test_shift1"}  # tested as D_det is: true and shifted labels
    rows = {c["id"]: c for c in json.loads((out / "results.json").read_text())["claims"]}
    assert rows["released_d_det.clean"]["suite"] == record["results"]["test"]["metrics"]["test/acc"]
    assert rows["released_d_det.clean"]["paper"] == rows["d_det.clean"]["paper"] == "43.7%"
    assert not any(i.startswith("released_d_robust") for i in rows)
    status = reproduce(out, data_dir, "--status")  # rebuilds the graph with --use / --released from the folder
    assert status.returncode == 0 and "released_d_det" in status.stdout, status.stderr[-2000:]
    nothing = reproduce(out, data_dir, "--released", str(authors_run["tmp"]))  # no released sets in that folder
    assert nothing.returncode != 0 and "no released dataset folder there" in nothing.stderr


@pytest.mark.slow
def test_the_authors_resnet_is_tested_in_place_of_the_cnn_of_a_mini_stage(tmp_path, data_dir):
    authors = tmp_path / "cifar_l2_0_5.pt"  # the robustness library's format; its ResNet-18, not mini's CNN
    library_file(authors, resnet18())
    out = tmp_path / "out"
    result = reproduce(out, data_dir, "--only", "fresh", "--use", f"fresh={authors}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_imported(out, "fresh", authors, "robustness", {"arch": "resnet18", "arch_kwargs": {}})


def test_unsafe_missing_or_unknown_imports_are_refused_before_anything_runs(tmp_path, data_dir):
    unsafe = tmp_path / "cifar_linf_8.pt"
    MARKER.unlink(missing_ok=True)
    library_file(unsafe, resnet18(), hook=Payload())
    for use, message in ((f"standard={unsafe}", "nothing of it was run"),
                         (f"standard={tmp_path / 'nope.pt'}", "no such file"),
                         (f"nosuch={unsafe}", "the preset has no train stage 'nosuch'")):
        out = tmp_path / use.split("=")[0] / "out"
        result = reproduce(out, data_dir, "--use", use)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert not (out / "standard" / "stage.json").exists()
    assert not MARKER.exists()
