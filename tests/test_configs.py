"""The configs as the CLI resolves them: a scale's base file plus an experiment's file (LightningCLI's repeated
--config, list replacement, ``callbacks+``), the default run directory, and what each preset's stages train,
read from the commands the pipeline builds, parsed."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
from helpers import class_names, parsed_config

from common.attack_settings import NAKKIRAN_ATTACKS, NAKKIRAN_STEPS
from pipeline.presets import NORMS, preset
from pipeline.stages import REPO, commands

OUT = Path("/nonexistent/out")  # commands() only builds paths; nothing is read or written there
SCALES = ("mini", "cifar10")
EXPERIMENTS = sorted((scale, p.stem) for scale in SCALES for p in (REPO / "configs" / scale).glob("*.yaml")
                     if p.name != "base.yaml")


def one_line(scale: str, experiment: str, *args: str) -> dict:
    """The README's one-line form of a run: the scale's base file, then the experiment's."""
    return parsed_config(["fit", "--config", str(REPO / f"configs/{scale}/base.yaml"),
                          "--config", str(REPO / f"configs/{scale}/{experiment}.yaml"), *args])


@functools.cache
def stage_config(preset_name: str, stage: str, step: str = "fit") -> dict:
    """The parsed config of one step of a preset's stage, from the argv the pipeline would run."""
    found = next(s for s in preset(preset_name) if s.name == stage)
    argv = dict(commands(found, OUT))[step]
    return parsed_config(argv[2:])


def test_every_experiment_has_a_one_line_command_that_writes_to_runs_scale_experiment():
    assert len(EXPERIMENTS) == 39, EXPERIMENTS
    for scale, experiment in EXPERIMENTS:
        config = one_line(scale, experiment)
        run_dir = f"runs/{scale}/{experiment}"
        assert config["run_dir"] == run_dir and config["trainer"]["default_root_dir"] == run_dir, experiment
        assert {lg["init_args"]["save_dir"] for lg in config["trainer"]["logger"]} == {run_dir}, experiment
        checkpoints = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
        assert checkpoints and {c["init_args"]["dirpath"] for c in checkpoints} == {f"{run_dir}/checkpoints"}


def test_no_config_holds_a_run_path():
    for path in (REPO / "configs").rglob("*.yaml"):
        text = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        for key in ("default_root_dir", "dirpath", "output_dir"):
            assert f"{key}:" not in text, (path, key)


def test_an_explicit_run_dir_wins_and_overlays_do_not_rename_a_run():
    no_sweep = str(REPO / "configs/overlays/no_sweep.yaml")
    assert one_line("mini", "standard", "--config", no_sweep)["run_dir"] == "runs/mini/standard"
    elsewhere = one_line("mini", "standard", "--run_dir", "/tmp/elsewhere")
    assert elsewhere["trainer"]["default_root_dir"] == "/tmp/elsewhere"


def test_a_list_of_the_same_length_is_merged_item_by_item(tmp_path):
    three = tmp_path / "three.yaml"
    three.write_text("trainer:\n  callbacks:\n"
                     "    - {class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: {save_top_k: 2}}\n"
                     "    - {class_path: pytorch_lightning.callbacks.LearningRateMonitor}\n"
                     "    - {class_path: pytorch_lightning.callbacks.Timer}\n")
    one = tmp_path / "one.yaml"
    one.write_text("trainer:\n  callbacks:\n"
                   "    - {class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: {save_top_k: 2}}\n")
    base = ["fit", "--config", str(REPO / "configs/cifar10/base.yaml"), "--config"]
    merged = parsed_config([*base, str(three)])["trainer"]["callbacks"]
    assert class_names(merged) == ["ModelCheckpoint", "LearningRateMonitor", "Timer"]
    assert merged[0]["init_args"]["auto_insert_metric_name"] is False  # kept from the base's ModelCheckpoint
    replaced = parsed_config([*base, str(one)])["trainer"]["callbacks"][0]["init_args"]
    assert replaced["auto_insert_metric_name"] is True and replaced["filename"] is None  # a new item: defaults


def test_a_later_config_replaces_lists_and_callbacks_plus_appends():
    standard = one_line("mini", "standard")
    assert class_names(standard["trainer"]["callbacks"]) == ["ModelCheckpoint", "LearningRateMonitor",
                                                             "RobustAccuracy"]  # base's two, then standard's
    no_sweep = one_line("mini", "standard", "--config", str(REPO / "configs/overlays/no_sweep.yaml"))
    assert class_names(no_sweep["trainer"]["callbacks"]) == ["ModelCheckpoint", "LearningRateMonitor"]
    wandb = one_line("mini", "standard", "--config", str(REPO / "configs/loggers/wandb.yaml"))
    assert class_names(wandb["trainer"]["logger"]) == ["CSVLogger", "TensorBoardLogger", "WandbLoggerWithFallback"]
    assert {lg["init_args"]["save_dir"] for lg in wandb["trainer"]["logger"]} == {"runs/mini/standard"}
    # A new class_path keeps the init_args the new class also takes: the base's batch sizes reach D_det's data.
    d_det = one_line("mini", "d_det")["data"]
    assert d_det["class_path"] == "datamodules.ConstructedDataModule"
    assert (d_det["init_args"]["batch_size"], d_det["init_args"]["eval_batch_size"]) == (256, 1000)
    # jsonargparse's catch: a list as long as the earlier one is merged item by item, and an item of the same class
    # keeps the earlier item's init_args it does not set (configs/cifar10/squares.yaml sets them for that reason).
    paper_squares = one_line("cifar10", "squares")["trainer"]["callbacks"][0]["init_args"]
    assert (paper_squares["filename"], paper_squares["auto_insert_metric_name"]) == ("{epoch}", True)
    # A mapping value replaces the base's: arch_kwargs is the experiment's alone.
    assert one_line("mini", "squares")["model"]["init_args"]["arch_kwargs"] == {"widths": [16, 32, 64], "pool": "avg"}


@pytest.mark.parametrize("preset_name", ["mini", "paper"])
def test_nakkiran_datasets_are_made_with_nakkiran_attacks_from_his_models(preset_name):
    stages = {s.name: s for s in preset(preset_name)}
    target = next(d for d in stages["nakkiran_ddet_l2"].deps if d.startswith("standard"))
    members = [d for d in stages["nakkiran_ddet_l2"].deps if d.startswith("ensemble_seed_")]
    target_model = stage_config(preset_name, target)["model"]["init_args"]
    for kind in ("nakkiran", "pgd"):
        for norm in NORMS:
            data = stage_config(preset_name, f"{kind}_ddet_{norm}")["data"]["init_args"]
            recipe = data["recipe"]
            expected_class = "NonTransferableAttack" if kind == "nakkiran" else "RelabelByAttack"
            assert recipe["class_path"] == f"datamodules.{expected_class}"
            args = recipe["init_args"]
            assert (args["norm"], args["steps"], args["targets"], args["shift"]) == (norm, NAKKIRAN_STEPS, "shift", 1)
            for key in ("eps", "step_size"):
                assert math.isclose(args[key], NAKKIRAN_ATTACKS[norm][key], rel_tol=1e-9), (kind, norm, key)
            sources = [str(OUT / name / "checkpoints/last.ckpt") for name in
                       [target, *(members if kind == "nakkiran" else [])]]
            assert data["sources"] == sources and data["augment"] is False
            student = stage_config(preset_name, f"{kind}_ddet_{norm}")["model"]["init_args"]
            # The student is of the target's family (Nakkiran: ResNet-18 everywhere).
            assert (student["arch"], student["arch_kwargs"]) == (target_model["arch"], target_model["arch_kwargs"])
            assert data["source_arch"] == target_model["arch"]


@pytest.mark.parametrize("preset_name", ["mini", "paper"])
def test_figure3_students_train_on_the_one_d_det_with_their_own_architecture(preset_name):
    stages = {s.name: s for s in preset(preset_name)}
    d_det = stage_config(preset_name, "d_det")
    students = [name for name in stages if name.startswith("d_det_")]
    assert students == {"mini": ["d_det_nowhiten"], "paper": ["d_det_resnet18", "d_det_vgg16"]}[preset_name]
    figure3 = stages["figure3"].overrides
    assert figure3[figure3.index("--ddet") + 1:figure3.index("--transfer")] == (
        "{dir:d_det}", *(f"{{dir:{s}}}" for s in students))
    for student in students:
        config = stage_config(preset_name, student)
        assert config["data"] == d_det["data"]  # the same dataset, hence the same cache key
        fresh = stage_config(preset_name, f"fresh_{student.removeprefix('d_det_')}")["model"]["init_args"]
        model = config["model"]["init_args"]
        assert (model["arch"], model["arch_kwargs"]) == (fresh["arch"], fresh["arch_kwargs"])
        assert (model["arch"], model["arch_kwargs"]) != (d_det["model"]["init_args"]["arch"],
                                                       d_det["model"]["init_args"]["arch_kwargs"])


def test_mini_helpers_train_briefly_without_sweeps_and_main_stages_keep_theirs():
    for name in ("ensemble_seed_1", "ensemble_seed_3", "fresh", "fresh_nowhiten"):
        config = stage_config("mini", name)
        assert config["trainer"]["max_epochs"] == 4, name
        assert "RobustAccuracy" not in class_names(config["trainer"]["callbacks"]), name
    for name in ("standard", "adversarial_l2", "d_det", "nakkiran_ddet_linf"):
        assert "RobustAccuracy" in class_names(stage_config("mini", name)["trainer"]["callbacks"]), name
    assert "RobustAccuracy" in class_names(stage_config("mini", "d_det", "test")["trainer"]["callbacks"])
    shifted = stage_config("mini", "d_det", "test_shift1")
    assert "RobustAccuracy" not in class_names(shifted["trainer"]["callbacks"])
    assert shifted["data"]["init_args"]["test_label_shift"] == 1


REHEARSAL_CUTS = {  # the only keys the rehearsal may change: sizes, steps, epochs, batch limits
    "trainer/max_epochs", "trainer/limit_train_batches", "trainer/limit_val_batches", "trainer/limit_test_batches",
    "data/init_args/train_size", "data/init_args/test_size", "data/init_args/eval_batch_size",
    "data/init_args/recipe/init_args/steps", "model/init_args/steps",
    *(f"trainer/callbacks/init_args/{k}" for k in ("every_n_epochs", "val_examples", "val_steps", "test_examples",
                                                   "test_steps", "batch_size", "steps", "sweep_examples")),
}


def differing_keys(a, b, path: str = "") -> set[str]:
    """Paths (list indices dropped) where two parsed configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k for key in a.keys() | b.keys()
                for k in differing_keys(a.get(key), b.get(key), f"{path}/{key}".lstrip("/"))}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and any(isinstance(x, dict) for x in a):
        return {k for x, y in zip(a, b, strict=True) for k in differing_keys(x, y, path)}
    return set() if a == b else {path}


def test_the_rehearsal_is_the_paper_graph_with_only_sizes_cut():
    paper, rehearsal = preset("paper"), preset("paper", rehearse=True)
    assert [(s.name, s.deps, s.config, s.base) for s in paper] == [(s.name, s.deps, s.config, s.base)
                                                                   for s in rehearsal]
    for full, cut in zip(paper, rehearsal, strict=True):
        if full.kind == "measure":
            assert cut.overrides[:len(full.overrides)] == full.overrides  # later values of --examples/--steps win
            continue
        changed = differing_keys(parsed_config(dict(commands(full, OUT))["fit"][2:]),
                                 parsed_config(dict(commands(cut, OUT))["fit"][2:]))
        assert changed and changed <= REHEARSAL_CUTS, (full.name, changed - REHEARSAL_CUTS)


def test_only_the_paper_preset_is_rehearsed():
    with pytest.raises(ValueError, match="--rehearse rehearses the paper preset"):
        preset("mini", rehearse=True)
