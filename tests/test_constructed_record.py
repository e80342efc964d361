"""The record a fit on a constructed dataset leaves in its run directory (``constructed.json``), and the pipeline's
reader of it: the pipeline finds the cache key, statistics and example grid there, never in the console output."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import TINY, N, Synthetic, write_checkpoint

import datamodules
from datamodules import NonTransferableAttack, RelabelByAttack, RepresentationInversion
from datamodules.constructed import datamodule as constructed_datamodule
from lightning_modules import ClassifierModule
from pipeline import outputs

KEYS = {"format", "key", "directory", "grid", "recipe", "sources", "examples", "keep", "trained_examples", "origin",
        "generation", "seconds", "stats"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("source") / "source.ckpt")


def fit(ckpt: Path, cache: Path, run_dir: Path, precision: str = "32-true", **data) -> Synthetic:
    """One optimizer step of a tiny network on a constructed set of 64 images, in a real Trainer."""
    dm = Synthetic([str(ckpt)], RelabelByAttack("shift", steps=2), cache_dir=str(cache), shard_size=16,
                   generation_batch_size=8, generation_seed=3, progress_bar=False, batch_size=32, augment=False,
                   **data)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=run_dir,
                         precision=precision)
    trainer.fit(ClassifierModule(**TINY), dm)
    return dm


def test_a_fit_records_its_constructed_set_and_the_pipeline_reads_only_that_record(ckpt, tmp_path, monkeypatch):
    dm = fit(ckpt, tmp_path / "cache", tmp_path / "run")
    record = outputs.constructed_record(tmp_path / "run")
    assert record == json.loads((tmp_path / "run" / "constructed.json").read_text())
    assert set(record) == KEYS and record["format"] == 1
    # The key is the one the cache on disk was written under.
    directory = Path(record["directory"])
    manifest = json.loads((directory / "manifest.json").read_text())
    assert record["key"] == manifest["key"] == dm.constructed.manifest["key"]
    assert directory == dm.constructed.directory and directory.name == f"relabel_by_attack-{record['key']}"
    assert Path(record["grid"]) == directory / "examples.png" and Path(record["grid"]).stat().st_size > 1000
    # The recipe as a config names it: class_path and init_args rebuild the same recipe (same cache key part).
    assert record["recipe"] == {"class_path": "datamodules.RelabelByAttack", "init_args": {
        "targets": "shift", "eps": 0.5, "step_size": 0.1, "steps": 2, "use_best": True, "shift": 1}}
    module, _, name = record["recipe"]["class_path"].rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**record["recipe"]["init_args"])
    assert rebuilt.describe() == dm.recipe.describe()
    assert record["sources"] == [str(ckpt)] and record["examples"] == N and record["origin"] == f"{N} generated now"
    assert record["keep"] is None and record["trained_examples"] == N  # D_det trains on every example
    assert record["generation"] == {"precision": "32-true", "batch_size": 8, "seed": 3, "channels_last": False,
                                    "intra_op_threads": torch.get_num_threads()}
    assert record["generation"]["intra_op_threads"] == manifest["numerics"]["intra_op_threads"]
    assert record["seconds"] == manifest["generation_seconds"]
    assert {k: record["stats"][k] for k in manifest["stats"]} == manifest["stats"]
    assert set(record["stats"]) == {*manifest["stats"], "generation_seconds", "image_steps_per_second"}
    assert outputs.constructed_grid(tmp_path / "run") == record["grid"]

    # A second fit, from the cache, with the console message reworded (here: gone): the record alone tells the
    # pipeline where the grid is.
    said = []
    monkeypatch.setattr(constructed_datamodule, "rank_zero_info", lambda message, *a, **k: said.append(message))
    fit(ckpt, tmp_path / "cache", tmp_path / "again")
    again = outputs.constructed_record(tmp_path / "again")
    assert said and "from the cache" in said[0]  # the message is still made, only not printed
    assert again["origin"] == "from the cache" and again["key"] == record["key"]
    assert outputs.constructed_grid(tmp_path / "again") == record["grid"]
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["constructed.json"]  # no log to parse


def test_generation_follows_the_trainer_precision_unless_pinned(ckpt, tmp_path):
    """One --trainer.precision sets a whole run's numerics: generation_precision defaults to the trainer's."""
    fit(ckpt, tmp_path / "cache", tmp_path / "fp32")
    fp32 = outputs.constructed_record(tmp_path / "fp32")
    fit(ckpt, tmp_path / "cache", tmp_path / "bf16", precision="bf16-mixed")
    bf16 = outputs.constructed_record(tmp_path / "bf16")
    fit(ckpt, tmp_path / "cache", tmp_path / "pinned", precision="bf16-mixed", generation_precision="32-true")
    pinned = outputs.constructed_record(tmp_path / "pinned")
    assert fp32["generation"]["precision"] == "32-true" and bf16["generation"]["precision"] == "bf16-mixed"
    assert bf16["key"] != fp32["key"] and bf16["origin"] == f"{N} generated now"
    assert pinned["generation"]["precision"] == "32-true" and pinned["key"] == fp32["key"]
    assert pinned["origin"] == "from the cache"


def test_no_record_without_a_run_and_none_read_where_there_is_none(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = Synthetic([str(ckpt)], RelabelByAttack("shift", steps=1), cache_dir=str(tmp_path / "cache"), shard_size=32,
                   progress_bar=False)
    dm.setup("fit")  # no trainer: no run directory to write into
    assert dm.constructed is not None and not list(tmp_path.rglob("constructed.json"))
    assert outputs.constructed_record(tmp_path) is None and outputs.constructed_grid(tmp_path) is None
    assert outputs.CONSTRUCTED_JSON == constructed_datamodule.RECORD


@pytest.mark.parametrize("recipe", [RelabelByAttack(), NonTransferableAttack(), RepresentationInversion()])
def test_recipe_class_paths_name_the_classes_configs_use(recipe):
    name = type(recipe).__name__
    assert recipe.class_path() == f"datamodules.{name}" and getattr(datamodules, name) is type(recipe)
    json.dumps(recipe.config())  # plain JSON
