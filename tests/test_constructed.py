"""Constructed datasets: recipes, per-example seeding, sharding over processes, the cache, released files."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import N, Payload, Synthetic, experiment_configs, save_released, write_checkpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from common.errors import ConfigError
from datamodules import (
    CacheWarning,
    CIFAR10DataModule,
    ConstructedDataModule,
    DatasetFilesError,
    GenerationError,
    RelabelByAttack,
    ReleasedDataModule,
    RepresentationInversion,
    UnsafeFileError,
    load_released,
)
from datamodules.constructed import example_generator
from datamodules.constructed.recipes import other_positions
from datamodules.constructed.store import tensor_sha256
from lightning_modules import ClassifierModule
from models import load_source
from models.fusion import fold_batchnorm

REPO = Path(__file__).resolve().parents[1]


class Counting(RelabelByAttack):
    """RelabelByAttack (same name and config, so the same cache key) that counts the examples it makes and
    can crash, like a killed job, when it reaches example ``crash_at``."""

    def __init__(self, *args, crash_at: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.generated, self.crash_at = 0, crash_at

    def __call__(self, sources, batch):
        if self.crash_at is not None and self.crash_at in batch.indices.tolist():
            raise KeyboardInterrupt("simulated kill")
        self.generated += len(batch.y)
        return super().__call__(sources, batch)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("source") / "source.ckpt")


def synthetic(ckpt: Path, cache: Path, recipe=None, **kw) -> Synthetic:
    recipe = recipe if recipe is not None else RelabelByAttack("shift", steps=3)
    options = {"shard_size": 16, "generation_batch_size": 8, "progress_bar": False, **kw}
    return Synthetic([str(ckpt)], recipe, cache_dir=str(cache), **options)


def built(dm: ConstructedDataModule) -> ConstructedDataModule:
    dm.setup("fit")
    return dm


def shard_hashes(dm: ConstructedDataModule) -> list[str]:
    return [s["sha256"] for s in dm.constructed.manifest["shards"]]


# ------------------------------------------------------------------------------------------------ recipes


def test_random_targets_are_uniform_per_example_and_may_equal_the_label():
    recipe, n = RelabelByAttack("random"), 5000
    y = torch.arange(n) % 10
    targets = recipe.choose_targets(y, [example_generator(0, i) for i in range(n)], 10)
    counts = torch.bincount(targets, minlength=10)
    assert counts.min() > 420 and counts.max() < 580, counts  # 500 +- 3.8 standard deviations
    assert 0.08 < (targets == y).float().mean() < 0.12  # t == y is allowed, at the uniform rate
    # An example's target depends on (seed, index) only, not on its batch mates.
    alone = recipe.choose_targets(y[123:124], [example_generator(0, 123)], 10)
    assert alone.item() == targets[123].item()
    other_seed = recipe.choose_targets(y, [example_generator(1, i) for i in range(n)], 10)
    assert (other_seed != targets).float().mean() > 0.8


@pytest.mark.parametrize("targets", ["shift", "random"])
def test_relabelled_sets_do_not_depend_on_batching(ckpt, tmp_path, targets):
    small = built(synthetic(ckpt, tmp_path, RelabelByAttack(targets, steps=3), generation_batch_size=8))
    large = built(synthetic(ckpt, tmp_path, RelabelByAttack(targets, steps=3), generation_batch_size=32,
                            shard_size=64))
    assert small.constructed.directory != large.constructed.directory  # batch size is part of the key
    true_y = small.clean_train[1]
    if targets == "shift":  # D_det
        assert torch.equal(small.train[1], (true_y + 1) % 10)
    else:  # D_rand: both labels and a few equal to the true label
        assert 0 < (small.train[1] == true_y).sum() < N // 3
    assert torch.equal(small.train[1], large.train[1])
    assert torch.allclose(small.train[0], large.train[0], atol=1e-5)
    assert (small.train[0] - small.clean_train[0].float() / 255).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5


def test_inversion_starts_from_another_image_and_reduces_the_representation_distance(ckpt, tmp_path):
    starts = built(synthetic(ckpt, tmp_path, RepresentationInversion(steps=0)))
    pool = starts.clean_train[0].float() / 255
    match = (starts.train[0].flatten(1)[:, None] == pool.flatten(1)[None]).all(-1)  # [N, N]: which image it is
    assert torch.equal(match.sum(1), torch.ones(N, dtype=torch.long)) and not match.diagonal().any()
    assert torch.equal(starts.train[1], starts.clean_train[1])  # D_R / D_NR keep the original labels
    rebatched = built(synthetic(ckpt, tmp_path, RepresentationInversion(steps=0), generation_batch_size=64))
    assert torch.equal(rebatched.train[0], starts.train[0])
    assert torch.equal(other_positions(torch.tensor([5]), [example_generator(0, 5)], N),
                       other_positions(torch.arange(N), [example_generator(0, i) for i in range(N)], N)[5:6])

    inverted = built(synthetic(ckpt, tmp_path, RepresentationInversion(step_size=0.1, steps=20)))
    stats = inverted.constructed.stats
    assert (stats["representation_distance"] < stats["start_distance"]).all()
    assert stats["representation_distance"].mean() < 0.7 * stats["start_distance"].mean()


# -------------------------------------------------------------------------------------- processes and cache


def _ddp_worker(rank: int, world: int, init_file: str, ckpt: str, cache: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dm = built(synthetic(Path(ckpt), Path(cache), RelabelByAttack("random", steps=3)))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"data": tensor_sha256(*dm.train)}))
    finally:
        dist.destroy_process_group()


def test_one_and_two_processes_give_identical_bytes(ckpt, tmp_path):
    # At the same thread count as each DDP rank: the CPU thread count is part of the key (tests/test_determinism.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = built(synthetic(ckpt, tmp_path / "one", RelabelByAttack("random", steps=3)))
    finally:
        torch.set_num_threads(threads)
    assert single.constructed.manifest["numerics"]["intra_op_threads"] == 1
    # fork (Lightning's ddp_fork) starts in milliseconds; spawn re-imports torch and Lightning in each child.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(ckpt), str(tmp_path / "two"),
                                          str(tmp_path)), nprocs=2, join=True, start_method=method)
    directory = tmp_path / "two" / single.constructed.directory.name  # same key whatever the world size
    manifest = json.loads((directory / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest["shards"]] == shard_hashes(single)
    records = [json.loads(p.read_text()) for p in sorted(directory.glob("shard_*.json"))]
    assert [r["rank"] for r in records] == [0, 1, 0, 1]  # shard i made by rank i % 2
    for rank in (0, 1):  # every rank holds the whole set
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["data"] == tensor_sha256(*single.train)


def test_second_run_reuses_the_cache_and_changes_make_new_keys(ckpt, tmp_path):
    first = built(synthetic(ckpt, tmp_path, Counting("shift", steps=3)))
    again = built(synthetic(ckpt, tmp_path, Counting("shift", steps=3)))
    assert first.recipe.generated == N and again.recipe.generated == 0
    assert torch.equal(first.train[0], again.train[0]) and torch.equal(first.train[1], again.train[1])
    other_steps = built(synthetic(ckpt, tmp_path, Counting("shift", steps=2)))
    other_seed = built(synthetic(ckpt, tmp_path, Counting("shift", steps=3), generation_seed=1))
    retrained = built(synthetic(write_checkpoint(tmp_path / "retrained.ckpt", seed=1), tmp_path,
                                Counting("shift", steps=3)))
    copied = tmp_path / "copy.ckpt"  # same content under another path: same key
    copied.write_bytes(ckpt.read_bytes())
    same = built(synthetic(copied, tmp_path, Counting("shift", steps=3)))
    assert same.recipe.generated == 0 and same.constructed.directory == first.constructed.directory
    dirs = {dm.constructed.directory for dm in (first, other_steps, other_seed, retrained)}
    assert len(dirs) == 4 and all(dm.recipe.generated == N for dm in (other_steps, other_seed, retrained))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(d.name for d in dirs)


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # inside the image data
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["bit_flip", "truncated", "shard_missing", "record_missing"])
def test_damaged_shards_are_detected_and_rebuilt_with_a_warning(ckpt, tmp_path, damage):
    clean = built(synthetic(ckpt, tmp_path, Counting("shift", steps=3)))
    shard = clean.constructed.directory / "shard_00002.safetensors"
    {"bit_flip": flip_a_bit, "truncated": truncate, "shard_missing": Path.unlink,
     "record_missing": lambda p: p.with_suffix(".json").unlink()}[damage](shard)
    with pytest.warns(CacheWarning, match="shard_00002"):
        rebuilt = built(synthetic(ckpt, tmp_path, Counting("shift", steps=3)))
    assert rebuilt.recipe.generated == 16  # that shard only
    assert shard_hashes(rebuilt) == shard_hashes(clean) and torch.equal(rebuilt.train[0], clean.train[0])


@pytest.mark.parametrize("damage", ["missing", "garbled"])
def test_a_lost_manifest_is_rewritten_from_the_verified_shards(ckpt, tmp_path, damage):
    clean = built(synthetic(ckpt, tmp_path, Counting("shift", steps=3)))
    manifest = clean.constructed.directory / "manifest.json"
    manifest.unlink() if damage == "missing" else manifest.write_text('{"shards": [')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = built(synthetic(ckpt, tmp_path, Counting("shift", steps=3)))
    cache_warnings = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert len(cache_warnings) == (1 if damage == "garbled" else 0)
    assert again.recipe.generated == 0  # the shards were intact: nothing regenerated
    assert json.loads(manifest.read_text())["shards"] == clean.constructed.manifest["shards"]


def test_an_interrupted_generation_resumes_to_identical_bytes(ckpt, tmp_path):
    reference = built(synthetic(ckpt, tmp_path / "uninterrupted", Counting("random", steps=3)))
    with pytest.raises(KeyboardInterrupt):  # killed inside the third shard (examples 32..47)
        built(synthetic(ckpt, tmp_path / "killed", Counting("random", steps=3, crash_at=40)))
    directory = tmp_path / "killed" / reference.constructed.directory.name
    assert sorted(p.name for p in directory.glob("shard_*.safetensors")) == [
        "shard_00000.safetensors", "shard_00001.safetensors"] and not (directory / "manifest.json").exists()
    resumed = built(synthetic(ckpt, tmp_path / "killed", Counting("random", steps=3)))
    assert resumed.recipe.generated == N - 32  # only the unfinished shards
    assert shard_hashes(resumed) == shard_hashes(reference)
    for name in ("shard_00002.safetensors", "shard_00003.safetensors"):
        assert hashlib.sha256((directory / name).read_bytes()).digest() == hashlib.sha256(
            (reference.constructed.directory / name).read_bytes()).digest()


def test_cache_holds_safetensors_and_json_only(ckpt, tmp_path):
    from safetensors import safe_open

    dm = built(synthetic(ckpt, tmp_path))
    files = sorted(p.name for p in dm.constructed.directory.iterdir())
    assert {Path(f).suffix for f in files} == {".safetensors", ".json", ".png"}
    for path in dm.constructed.directory.glob("*.safetensors"):
        assert path.read_bytes()[:1] != b"\x80" and not path.read_bytes().startswith(b"PK")  # no pickle, no zip
        with safe_open(str(path), "pt") as f:
            assert f.get_tensor("x").dtype == torch.float32 and f.get_tensor("y").dtype == torch.int64
    manifest = dm.constructed.manifest
    assert manifest["examples"] == N and manifest["bytes"] >= N * 3 * 16 * 16 * 4
    assert manifest["sources"][0]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert {"attack_success", "perturbation_l2"} <= set(manifest["stats"]) and manifest["image_steps_per_second"] > 0


def test_nan_output_stops_generation_and_names_the_examples(tmp_path):
    broken = write_checkpoint(tmp_path / "nan.ckpt", nan=True)
    with pytest.raises(GenerationError, match=r"examples \[0, 1, 2, 3, 4, 5, 6, 7\]"):
        built(synthetic(broken, tmp_path / "cache"))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_source_checkpoint_errors_are_clear(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_source(tmp_path / "nowhere.ckpt")
    with pytest.raises(ValueError, match="arch='fast_cnn'.*expects 'resnet50'"):
        load_source(ckpt, arch="resnet50")
    with pytest.raises(ValueError, match="num_classes=100"):
        load_source(write_checkpoint(tmp_path / "c100.ckpt", num_classes=100), num_classes=10)
    source = load_source(ckpt, arch="fast_cnn", num_classes=10)
    assert not source.model.training and source.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_test_label_shift_shifts_test_labels_only(ckpt, tmp_path):
    plain, shifted = (built(synthetic(ckpt, tmp_path, test_label_shift=s)) for s in (0, 1))
    assert torch.equal(shifted.test[1], (plain.test[1] + 1) % 10) and torch.equal(shifted.val[1], plain.val[1])


# ---------------------------------------------------------------------------------------------- released


def test_released_dataset_loads_as_concatenated_lists_and_trains_against_the_real_test_set(tmp_path, data_dir):
    for name, legacy in (("legacy", True), ("ddet_CIFAR", False)):
        x, y = save_released(tmp_path / name, legacy=legacy)
        loaded_x, loaded_y = load_released(tmp_path / name)
        assert torch.equal(loaded_x, x) and torch.equal(loaded_y, y)
    dm = ReleasedDataModule(folder=str(tmp_path / "ddet_CIFAR"), data_dir=str(data_dir), test_label_shift=1)
    dm.setup("fit")
    real_test_y = CIFAR10DataModule(data_dir=str(data_dir)).load()[3]
    assert torch.equal(dm.train[0], x) and len(dm.test[1]) == 10000
    assert torch.equal(dm.test[1], (real_test_y + 1) % 10)
    (tmp_path / "ddet_CIFAR" / "CIFAR_lab").unlink()
    with pytest.raises(DatasetFilesError, match="lacks CIFAR_lab"):
        load_released(tmp_path / "ddet_CIFAR")


def test_released_loader_refuses_files_that_need_arbitrary_unpickling(tmp_path):
    folder, marker = tmp_path / "evil", tmp_path / "pwned"
    save_released(folder)
    torch.save([torch.rand(2, 3, 32, 32), Payload(marker)], folder / "CIFAR_ims")
    with pytest.raises(UnsafeFileError, match="arbitrary unpickling"):
        load_released(folder)
    assert not marker.exists()
    torch.load(folder / "CIFAR_ims", weights_only=False)  # sanity check: full unpickling does run the payload
    assert marker.exists()


# ------------------------------------------------------------------------------------- real data, trainer


@pytest.fixture(scope="module")
def real_source(tmp_path_factory, data_dir) -> Path:
    """A tiny CNN trained for 2 epochs on 2,000 real CIFAR-10 images, saved by a real Lightning Trainer."""
    pl.seed_everything(0)
    root = tmp_path_factory.mktemp("real_source")
    dm = CIFAR10DataModule(data_dir=str(data_dir), train_size=2000, batch_size=100)
    model = ClassifierModule(arch="fast_cnn", arch_kwargs={"widths": [8, 16, 32]}, lr=0.05)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=root)
    trainer.fit(model, dm)
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt"


def test_ddet_from_a_real_checkpoint_inside_a_trainer_logs_statistics_and_example_grid(real_source, tmp_path,
                                                                                         data_dir):
    dm = ConstructedDataModule([str(real_source)], RelabelByAttack("shift", steps=10), data_dir=str(data_dir),
                               train_size=250, cache_dir=str(tmp_path / "cache"), augment=False,
                               source_arch="fast_cnn", progress_bar=False)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer = pl.Trainer(max_steps=1, logger=loggers, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, log_every_n_steps=1,
                         default_root_dir=tmp_path)
    trainer.fit(ClassifierModule(arch="fast_cnn", arch_kwargs={"widths": [8, 16, 32]}), dm)
    stats = dm.constructed.manifest["stats"]
    source = load_source(real_source).model
    with torch.no_grad():  # how often the source already predicts the target on clean images
        chance = (source(dm.clean_train[0].float() / 255).argmax(1) == dm.train[1]).float().mean().item()
    assert stats["attack_success"] > chance + 0.05 and 0.2 < stats["perturbation_l2"] <= 0.5 + 1e-5, chance
    assert torch.equal(dm.train[1], (dm.clean_train[1] + 1) % 10) and torch.equal(dm.test[1], dm.val[1])
    assert (dm.constructed.directory / "examples.png").stat().st_size > 10_000
    csv_text = (Path(loggers[0].log_dir) / "metrics.csv").read_text()
    assert "data/attack_success" in csv_text and "data/image_steps_per_second" in csv_text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(loggers[1].log_dir).Reload()
    assert "data/examples" in events.Tags()["images"] and "data/attack_success" in events.Tags()["scalars"]


def test_inversion_of_real_images_reduces_the_representation_distance(real_source, tmp_path, data_dir):
    dm = ConstructedDataModule([str(real_source)], RepresentationInversion(step_size=0.1, steps=30),
                               data_dir=str(data_dir), train_size=100, cache_dir=str(tmp_path), progress_bar=False)
    dm.setup("fit")
    stats = dm.constructed.stats
    assert stats["representation_distance"].mean() < 0.6 * stats["start_distance"].mean()
    assert torch.equal(dm.train[1], dm.clean_train[1])


def test_bf16_gives_the_labels_and_nearly_the_images_of_fp32(real_source, tmp_path, data_dir):
    def make(precision: str) -> ConstructedDataModule:
        return built(ConstructedDataModule([str(real_source)], RelabelByAttack("random", steps=5),
                                           data_dir=str(data_dir), train_size=20, cache_dir=str(tmp_path),
                                           generation_precision=precision, progress_bar=False))

    fp32, bf16 = make("32-true"), make("bf16-mixed")  # bf16 is slow on this CPU: keep it tiny
    assert fp32.constructed.directory != bf16.constructed.directory  # numerics are part of the key
    assert torch.equal(fp32.train[1], bf16.train[1])
    clean = fp32.clean_train[0].float() / 255
    moved = (fp32.train[0] - clean).flatten(1).norm(dim=1)
    differ = (fp32.train[0] - bf16.train[0]).flatten(1).norm(dim=1)
    assert moved.mean() > 0.3 and differ.median() < 0.2 * moved.median(), (differ, moved)
    assert (fp32.train[0] - bf16.train[0]).pow(2).mean().sqrt() < 1 / 255  # RMS: under one 8-bit grey level
    success = [dm.constructed.stats["attack_success"] for dm in (fp32, bf16)]
    assert (success[0] == success[1]).float().mean() >= 0.9


def test_folded_batchnorm_makes_its_own_key_and_nearly_the_same_dataset(real_source, tmp_path, data_dir):
    def make(fold: bool) -> ConstructedDataModule:
        return built(ConstructedDataModule([str(real_source)], RelabelByAttack("shift", steps=5),
                                           data_dir=str(data_dir), train_size=40, cache_dir=str(tmp_path),
                                           generation_fold_batchnorm=fold, progress_bar=False))

    assert fold_batchnorm(load_source(real_source).model)[1] > 0  # there is something to fold
    plain, folded = make(False), make(True)
    assert plain.constructed.directory != folded.constructed.directory  # it rounds differently: its own key
    assert folded.constructed.manifest["numerics"]["fold_batchnorm"] is True
    assert "fold_batchnorm" not in plain.constructed.manifest["numerics"]  # older keys stay as they were
    assert torch.equal(plain.train[1], folded.train[1])
    clean = plain.clean_train[0].float() / 255
    moved = (plain.train[0] - clean).flatten(1).norm(dim=1)
    assert moved.mean() > 0.3
    assert (plain.train[0] - folded.train[0]).pow(2).mean().sqrt() < 0.05 / 255  # far below one grey level
    success = [dm.constructed.stats["attack_success"] for dm in (plain, folded)]
    assert (success[0] == success[1]).float().mean() >= 0.95


def test_fold_batchnorm_must_be_a_boolean(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="generation_fold_batchnorm must be true or false"):
        synthetic(ckpt, tmp_path, generation_fold_batchnorm="yes")


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO)) for p in REPO.glob("configs/*/d_*.yaml")))
def test_constructed_configs_parse(config, capsys, monkeypatch):
    from train import main

    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *experiment_configs(Path(config).stem, Path(config).parent.name), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "datamodules.ConstructedDataModule" in printed and "sources:" in printed
