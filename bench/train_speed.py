"""Section 2: training throughput of the suite's LightningModules under ``pl.Trainer`` against a plain PyTorch
loop doing the same work: the same model and hyperparameters (read from the mini configs), the same
in-memory uint8 CIFAR-10 tensors cut into the same batches, the same on-device crop/flip augmentation, the
same optimizer and per-step schedule, fp32 channels_last. Adversarial training: AdversarialModule (our PGD)
against a plain loop with torchattacks PGDL2 of the same eps / steps / step size.

Timing covers the steady state: from the end of the last warm-up batch to the end of the last batch, so
the Trainer's fixed start-up cost is excluded (it is reported separately, per fit)."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchattacks
import yaml
from torch import nn
from torch.utils.data import DataLoader

from bench.common import CL, linear_schedule, median, spread
from common.tensors import as_float_images
from datamodules.augment import random_crop_flip
from datamodules.base import TensorBatches
from datamodules.real import CIFAR10DataModule
from lightning_modules.adversarial import AdversarialModule
from lightning_modules.classifier import ClassifierModule
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "configs" / "mini"
MODULES = {"standard": ClassifierModule, "adversarial_l2": AdversarialModule}


def read_config(name: str) -> tuple[dict, int]:
    """(model init_args, training batch size) of a mini experiment: its file's values over the scale's base.yaml
    (as LightningCLI stacks them; the model's class is in MODULES)."""
    base, experiment = (yaml.safe_load((MINI / f"{n}.yaml").read_text()) or {} for n in ("base", name))
    model = {**base["model"]["init_args"], **experiment.get("model", {}).get("init_args", {})}
    data = {**base["data"]["init_args"], **experiment.get("data", {}).get("init_args", {})}
    return model, int(data["batch_size"])


@contextlib.contextmanager
def quiet_lightning():
    """No info banners or data-loader advice in the benchmark's output."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


class StepClock(pl.Callback):
    """Wall-clock time from the end of batch ``warmup - 1`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.end = time.perf_counter()
        if batch_idx == self.warmup - 1:
            self.start = self.end


class ChannelsLastInput(nn.Module):
    """Feeds the model channels_last inputs, as ClassifierModule.forward does.

    The gradient that reaches a contiguous input of a channels_last model is itself channels_last, and
    torchattacks' PGDL2 then fails (``grad.view(batch, -1)``: "view size is not compatible with input tensor's
    size and stride"). When the input requires a gradient (inside torchattacks), a hook makes that gradient
    contiguous: one copy of the input gradient per attack step, the smallest change that lets it run."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x.register_hook(torch.Tensor.contiguous)
        return self.model(x.contiguous(memory_format=CL))


def lightning_run(name: str, datamodule: CIFAR10DataModule, batch_size: int, warmup: int,
                  batches: int) -> dict:
    """One fit of ``warmup + batches`` batches; seconds of the timed batches and of the whole fit."""
    init_args, _ = read_config(name)
    torch.manual_seed(0)
    module = MODULES[name](**init_args)
    clock = StepClock(warmup)
    datamodule.batch_size = batch_size
    with quiet_lightning():
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=warmup + batches,
                             limit_val_batches=0, num_sanity_val_steps=0, precision="32-true", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[clock])
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        total = time.perf_counter() - start
    return {"seconds": clock.end - clock.start, "fit_seconds": total}


def plain_run(name: str, datamodule: CIFAR10DataModule, batch_size: int, warmup: int, batches: int) -> dict:
    """The same training as ``lightning_run`` written as a plain loop (torchattacks PGDL2 for adversarial)."""
    hp, _ = read_config(name)
    torch.manual_seed(0)
    start_all = time.perf_counter()
    model = build_model(hp.get("arch", "fast_cnn"), **(hp.get("arch_kwargs") or {}))
    # As ClassifierModule.on_fit_start: data-initialised layers (the whitening stem) from 5,000 training images.
    model.fit_whitening(as_float_images(datamodule.train[0][:5000]))
    if hp.get("channels_last"):
        model.to(memory_format=CL)
    net = ChannelsLastInput(model) if hp.get("channels_last") else model
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"], nesterov=hp["nesterov"],
                          weight_decay=hp["weight_decay"])
    total = warmup + batches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total, hp.get("warmup_fraction", 0.0)))
    attack = None
    if name.startswith("adversarial"):
        if hp["norm"] != "l2" or hp.get("random_start"):
            raise ValueError("the plain adversarial loop implements the L2 config without random start only")
        attack = torchattacks.PGDL2(net, eps=hp["eps"], alpha=hp["step_size"], steps=hp["steps"],
                                    random_start=False)
    loader = DataLoader(TensorBatches(*datamodule.train, batch_size, shuffle=True, drop_last=True,
                                      seed=datamodule.seed), batch_size=None)
    model.train()
    start = None
    for i, (xb, yb) in zip(range(total), loader, strict=False):  # range first: no fetch after the last batch
        x = random_crop_flip(xb.float().div_(255), datamodule.crop_padding, datamodule.flip)
        if attack is not None:
            x = attack(x, yb)  # eval mode inside, train mode restored after
        loss = F.cross_entropy(net(x), yb, label_smoothing=hp.get("label_smoothing", 0.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if i == warmup - 1:
            start = time.perf_counter()
    end = time.perf_counter()
    return {"seconds": end - start, "fit_seconds": end - start_all}


def training_section(data_dir: str | None, runs: list[str], batch_size: int | None, warmup: int, batches: int,
                     reps: int) -> dict:
    """``{run: {"lightning": {...}, "plain": {...}, "overhead": ratio - 1}}``; Lightning and plain alternate."""
    if warmup < 1:
        raise ValueError("training throughput needs at least one warm-up batch")
    datamodule = CIFAR10DataModule(data_dir=data_dir, batch_size=batch_size or 256)
    datamodule.setup("fit")
    results = {}
    for name in runs:
        _, config_batch = read_config(name)
        bs = batch_size or config_batch
        lightning_run(name, datamodule, bs, warmup, 1)  # untimed: first-use costs of both paths
        plain_run(name, datamodule, bs, warmup, 1)
        timings: dict[str, list[dict]] = {"lightning": [], "plain": []}
        for rep in range(reps):  # alternate which goes first, so neither always follows the other
            order = ("lightning", "plain") if rep % 2 == 0 else ("plain", "lightning")
            for kind in order:
                run = lightning_run if kind == "lightning" else plain_run
                timings[kind].append(run(name, datamodule, bs, warmup, batches))
        entry = {"config": str((MINI / f"{name}.yaml").relative_to(ROOT)), "batch_size": bs, "warmup_batches": warmup,
                 "timed_batches": batches}
        for kind, reps_ in timings.items():
            seconds = [r["seconds"] for r in reps_]
            entry[kind] = {"seconds": seconds, "images_per_s": batches * bs / median(seconds),
                           "spread": spread(seconds), "fit_seconds": median([r["fit_seconds"] for r in reps_])}
        entry["overhead"] = entry["plain"]["images_per_s"] / entry["lightning"]["images_per_s"] - 1
        results[name] = entry
    return results
