"""Standard training end to end: the LightningModule on real data, the CLI, and DDP on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from helpers import experiment_configs

from datamodules import CIFAR10DataModule, InMemoryDataModule
from lightning_modules import ClassifierModule

REPO = Path(__file__).resolve().parents[1]


def tiny_trainer(tmp_path, **kw):
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, inference_mode=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kw})


def test_fast_cnn_learns_real_cifar10(tmp_path, data_dir):
    pl.seed_everything(0)
    dm = CIFAR10DataModule(data_dir=str(data_dir), train_size=5000, batch_size=128, eval_batch_size=1000)
    model = ClassifierModule(arch="fast_cnn", arch_kwargs={"widths": [32, 64, 128]}, lr=0.1, nesterov=True,
                             lr_schedule="linear", warmup_fraction=0.2, label_smoothing=0.1)
    trainer = tiny_trainer(tmp_path, max_epochs=3, limit_test_batches=2)
    trainer.fit(model, dm)
    acc = trainer.test(model, dm, verbose=False)[0]["test/acc"]
    assert acc > 0.35, f"test accuracy {acc:.3f} on 2000 real test images after 3 epochs on 5000"


def test_bf16_and_channels_last_train_on_cpu(tmp_path, data_dir):
    dm = CIFAR10DataModule(data_dir=str(data_dir), train_size=256, batch_size=64)
    model = ClassifierModule(arch="fast_cnn", arch_kwargs={"widths": [8, 16, 32]}, channels_last=True)
    trainer = tiny_trainer(tmp_path, precision="bf16-mixed", limit_val_batches=1)
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert model.model.body[0].weight.is_contiguous(memory_format=torch.channels_last)


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_fit_then_test_from_checkpoint(tmp_path):
    common = [*experiment_configs("standard"), "--data.init_args.train_size", "512",
              "--trainer.default_root_dir", str(tmp_path)]
    limits = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
    fit = run_cli("fit", *common, *limits, cwd=tmp_path)  # relative log dirs land in tmp_path
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpts = list(tmp_path.rglob("last.ckpt"))
    assert list(tmp_path.rglob("metrics.csv")) and list(tmp_path.rglob("events.out.tfevents*"))
    assert len(ckpts) == 1
    test = run_cli("test", *common, "--trainer.limit_test_batches", "1", "--ckpt_path", str(ckpts[0]), cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/acc" in test.stdout


def test_cli_rejects_unknown_key(tmp_path):
    out = run_cli("fit", *experiment_configs("standard"), "--model.init_args.lrr", "1",
                  cwd=tmp_path)
    assert out.returncode != 0 and "lrr" in out.stderr


class IndexedImages(InMemoryDataModule):
    """Synthetic images whose first two pixels encode their index (unit-test data only)."""

    def load(self):
        n = 96
        x = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
        x[:, 0, 0, 0], x[:, 0, 0, 1] = torch.arange(n) // 256, torch.arange(n) % 256
        x[:, 1:] = torch.randint(0, 256, (n, 2, 8, 8), generator=torch.Generator().manual_seed(0))
        y = torch.arange(n) % 10
        return x, y, x[:50].clone(), y[:50].clone()


class RecordingModule(ClassifierModule):
    def __init__(self, out_dir: str, **kw):
        super().__init__(**kw)
        self.out_dir, self.seen = out_dir, []

    def training_step(self, batch, batch_idx):
        x = (batch[0][:, 0, 0, :2] * 255).round().long()
        self.seen += (x[:, 0] * 256 + x[:, 1]).tolist()
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self):
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


def test_ddp_two_processes_split_data_and_agree_on_metrics(tmp_path):
    pl.seed_everything(0)
    model = RecordingModule(str(tmp_path), arch="fast_cnn", arch_kwargs={"widths": [8, 8, 8]})
    dm = IndexedImages(batch_size=16, augment=False)
    trainer = tiny_trainer(tmp_path, strategy="ddp_spawn", devices=2, accelerator="cpu")
    trainer.fit(model, dm)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 48 and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(96))
    # ddp_spawn hands the trained weights back: test them on 2 processes and on 1, the numbers must agree.
    two = trainer.test(model, dm, verbose=False)[0]["test/acc"]
    one = tiny_trainer(tmp_path).test(model, dm, verbose=False)[0]["test/acc"]
    assert abs(two - one) < 1e-6


def test_robust_accuracy_under_ddp_logs_the_reduced_value_without_a_sync_warning(tmp_path):
    args = [*experiment_configs("standard"), "--config", str(REPO / "configs/ci/tiny.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--run_dir", str(tmp_path / "run")]
    fit = run_cli("fit", *args, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "sync_dist" not in fit.stderr  # the value is already reduced over the ranks, and logged as such
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    rows = [r for r in metrics.read_text().splitlines()[1:] if r]
    header = metrics.read_text().splitlines()[0].split(",")
    column = header.index("val/robust_acc/l2_0.25")
    assert any(row.split(",")[column] for row in rows)
