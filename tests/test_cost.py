"""The dry-run's cost estimate (pipeline/cost.py): FLOPs per network, per stage from the parsed commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import experiment_configs, parsed_config

from pipeline import cost
from pipeline.cli import main as reproduce
from pipeline.presets import preset


def test_forward_flops_of_the_papers_networks_match_their_known_size():
    # CIFAR ResNet-50 is about 1.3 GMAC per image, ResNet-18 0.56, VGG-16 0.31 (2 FLOPs per multiply-add).
    assert 2.5e9 < cost.forward_flops({"arch": "resnet50"}) < 2.7e9
    assert 1.0e9 < cost.forward_flops({"arch": "resnet18"}) < 1.2e9
    assert 0.55e9 < cost.forward_flops({"arch": "vgg16"}) < 0.7e9


def test_a_stage_costs_its_images_times_epochs_times_steps():
    standard = parsed_config(["fit", *experiment_configs("standard")])
    per_image = cost.forward_flops(standard["model"]["init_args"])
    flops = cost.train_stage_flops(standard, tests=1)
    assert flops["train"] == 8 * 50_000 * cost.PASSES_PER_STEP * per_image
    adversarial = cost.train_stage_flops(parsed_config(["fit", *experiment_configs("adversarial_l2")]), tests=1)
    assert adversarial["train"] == 4 * 50_000 * cost.PASSES_PER_STEP * (1 + 2) * per_image  # 2 attack steps
    d_det = cost.train_stage_flops(parsed_config(["fit", *experiment_configs("d_det")]), tests=2)
    assert d_det["generation"] == 50_000 * 10 * cost.PASSES_PER_STEP * per_image  # 10 steps, one source


def test_a_dataset_shared_by_stages_is_generated_once(tmp_path):
    flops = cost.reproduction_flops(preset("mini"), tmp_path)
    assert flops["d_det"]["generation"] > 0 and flops["d_det_nowhiten"]["generation"] == 0.0


def test_dry_run_prints_the_cost_per_stage_and_the_rehearsal_is_a_sliver_of_it(tmp_path, capsys):
    def total(name: str, *flags: str) -> float:
        reproduce(["--preset", "paper", *flags, "--dry-run", "--rate-tflops", "100", "--out", str(tmp_path / name)])
        lines = capsys.readouterr().out.splitlines()
        assert any(line.startswith("compute (a floor") and "100.00 TFLOP/s (stated" in line for line in lines)
        assert sum(line.split()[0] in {s.name for s in preset("paper")} for line in lines if line[:2] == "  ") >= 29
        value, unit = next(line.split()[1:3] for line in lines if line.startswith("  all"))
        return float(value) * {"EFLOP": 1e18, "PFLOP": 1e15, "TFLOP": 1e12, "GFLOP": 1e9}[unit]

    paper, rehearsal = total("paper"), total("rehearsal", "--rehearse")
    assert paper > 1e17 and rehearsal < paper / 1000


@pytest.fixture(autouse=True)
def _data(monkeypatch, data_dir: Path):
    monkeypatch.setenv("BOF_DATA_DIR", str(data_dir))
