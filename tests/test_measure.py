"""The measure stages for real (``python -m pipeline.measure``): Nakkiran's transfer table and Figure 3 on small
CNNs trained on real CIFAR-10, their measure.json, and what reaches TensorBoard and an offline wandb run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import train_tiny  # tests/ is on sys.path under pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline import measure
from pipeline.outputs import CONSTRUCTED_JSON
from pipeline.runner import STAGE_JSON

REPO = Path(__file__).resolve().parents[1]
HPARAMS = {"arch": "fast_cnn", "num_classes": 10, "in_channels": 3, "arch_kwargs": {"widths": [8, 16, 32]}}


@pytest.fixture(scope="module")
def ckpts(cifar, tmp_path_factory) -> dict[str, str]:
    """Checkpoints (as Lightning writes them) of four small CNNs trained on 2,000 real training images."""
    root = tmp_path_factory.mktemp("measure_ckpts")
    x, y = cifar[0][:2000].float() / 255, cifar[1][:2000]
    paths = {}
    for seed, name in enumerate(("target", "member", "fresh", "fresh_other")):
        model = train_tiny(seed, x, y, epochs=1)
        paths[name] = str(root / f"{name}.ckpt")
        torch.save({"hyper_parameters": HPARAMS,
                    "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, paths[name])
    return paths


def finished_stage(path: Path, results: dict) -> str:
    """A stage folder with the stage.json the runner writes (what figure3 reads of trained D_det models)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / STAGE_JSON).write_text(json.dumps({"results": results}))
    return str(path)


D_DET = {"class_path": "datamodules.RelabelByAttack",
         "init_args": {"targets": "shift", "eps": 0.5, "step_size": 0.1, "steps": 3, "use_best": True, "shift": 1}}


def trained_on(stage: str, recipe: dict, key: str = "k1") -> str:
    """What a stage's ConstructedDataModule records of the dataset it trained on (the part figure3 reads)."""
    (Path(stage) / CONSTRUCTED_JSON).write_text(json.dumps({"format": 1, "key": key, "recipe": recipe}))
    return stage


def events(folder: Path) -> EventAccumulator:
    (run,) = {p.parent for p in folder.glob("tensorboard/**/events.out.tfevents*")}
    accumulator = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_transfer_and_figure3_measure_and_log_to_tensorboard(ckpts, data_dir, tmp_path):
    common = ["--examples", "40", "--batch_size", "20", "--data_dir", str(data_dir)]
    transfer = tmp_path / "transfer"
    table = measure.main(["transfer", "--out", str(transfer), "--target", ckpts["target"], "--ensemble",
                          ckpts["member"], "--fresh", ckpts["fresh"], "--steps", "3", *common])
    assert json.loads((transfer / "measure.json").read_text()) == json.loads(json.dumps(table))
    assert table["l2"]["examples"] == 40 and 0 <= table["l2"]["pgd_transfer"] <= 1
    scalars = events(transfer).Tags()["scalars"]
    assert {"transfer/l2/pgd_success", "transfer/linf/non_transferable_transfer"} <= set(scalars)
    logged = events(transfer).Scalars("transfer/l2/pgd_success")[0].value
    assert logged == pytest.approx(table["l2"]["pgd_success"])

    finished_stage(transfer, table)  # the figure3 stage reads the transfer stage's record
    ddet = trained_on(finished_stage(tmp_path / "d_det", {"test": {"metrics": {"test/acc": 0.31}}}), D_DET)
    other = trained_on(finished_stage(tmp_path / "d_det_other", {"test": {"metrics": {"test/acc": 0.22}}}), D_DET)
    nakkiran = finished_stage(tmp_path / "nakkiran_ddet_l2", {"test": {"metrics": {"test/acc": 0.05}}})
    out = tmp_path / "figure3"
    result = measure.main(["figure3", "--out", str(out), "--source", ckpts["target"], "--fresh", ckpts["fresh"],
                           ckpts["fresh_other"], "--ddet", ddet, other, "--transfer", str(transfer),
                           "--nakkiran_l2", nakkiran, *common])
    # The attack is the one the D_det runs recorded, not a copy of its numbers.
    assert result["attack"] == {"norm": "l2", "eps": 0.5, "step_size": 0.1, "steps": 3, "targets": "(y + 1) mod 10"}
    points = {p["stage"]: p for p in result["points"]}
    assert list(points) == ["d_det", "d_det_other", "nakkiran_ddet_l2"]
    assert points["d_det_other"]["accuracy"] == 0.22
    assert points["d_det"]["label"] == "D_det (fast_cnn (widths=[8, 16, 32]))"
    assert points["nakkiran_ddet_l2"]["transfer"] == table["l2"]["non_transferable_transfer"]
    assert all(0 <= points[s]["transfer"] <= 1 for s in ("d_det", "d_det_other"))
    assert (out / "figure3_transfer.png").stat().st_size > 1000
    tags = events(out).Tags()
    assert "figure3/d_det_other/transfer" in tags["scalars"] and "figure3/transfer_vs_accuracy" in tags["images"]


def test_figure3_refuses_d_det_stages_without_a_record_or_of_different_datasets(tmp_path):
    first, second = (tmp_path / "d_det", tmp_path / "d_det_other")
    first.mkdir()
    second.mkdir()
    with pytest.raises(ValueError, match=r"hold no constructed.json .*reproduce --force d_det"):
        measure.ddet_attack([str(first)])
    trained_on(str(first), D_DET)
    trained_on(str(second), D_DET, key="k2")
    with pytest.raises(ValueError, match="trained on different datasets"):
        measure.ddet_attack([str(first), str(second)])
    trained_on(str(second), {**D_DET, "init_args": {**D_DET["init_args"], "targets": "random"}})
    with pytest.raises(ValueError, match="must train on a D_det"):
        measure.ddet_attack([str(second)])
    assert measure.ddet_attack([str(first)]) == D_DET["init_args"]


def test_figure3_needs_one_fresh_model_per_d_det_stage(tmp_path):
    with pytest.raises(ValueError, match="one --fresh checkpoint per --ddet stage.*2 --ddet and 1 --fresh"):
        measure.figure3(source="s.ckpt", fresh=["f.ckpt"], ddet=["a", "b"], transfer=str(tmp_path))


def test_a_measure_stage_logs_to_an_offline_wandb_run_with_the_wandb_config(ckpts, data_dir, tmp_path,
                                                                           monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_RUN_GROUP", "mini-test")
    wandb.finish()  # a run left open by an earlier test would be reused (a measure stage is a process of its own)
    out = tmp_path / "transfer"
    measure.main(["transfer", "--out", str(out), "--target", ckpts["target"], "--ensemble", ckpts["member"],
                  "--fresh", ckpts["fresh"], "--examples", "20", "--steps", "1", "--data_dir", str(data_dir),
                  "--logger_config", str(REPO / "configs/loggers/wandb.yaml")])
    wandb.finish()
    assert list(out.glob("wandb/offline-run-*/run-*.wandb"))  # the config's save_dir went to the stage folder
    assert events(out).Tags()["scalars"] and (out / "csv").is_dir()  # the config lists CSV and TensorBoard too


def test_a_missing_logger_config_is_named(tmp_path):
    from pipeline.measure_loggers import build_loggers, logger_specs

    with pytest.raises(FileNotFoundError, match="--logger_config .*nope.yaml: cannot read it"):
        logger_specs([tmp_path / "nope.yaml"])
    (tmp_path / "off.yaml").write_text("trainer:\n  logger: false\n")
    assert logger_specs([tmp_path / "off.yaml"]) == []
    with pytest.raises(ValueError, match="has no class_path; write it as in configs/loggers/wandb.yaml"):
        build_loggers([{"init_args": {"name": "csv"}}], tmp_path, "transfer")
