"""What every section shares: timing with medians, the machine description, the matrix-multiply rate, the
real CIFAR-10 tensors and the briefly trained models that the attacks are run against."""

from __future__ import annotations

import datetime
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.numerics import AUTO, onednn_bf16, proc_cpuinfo, resolve_precision
from datamodules.augment import random_crop_flip
from datamodules.base import TensorBatches
from datamodules.cifar10 import load_cifar10
from datamodules.files import resolve_data_dir
from models import Classifier, build_model, load_source

CL = torch.channels_last
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")

# ------------------------------------------------------------------------------------------------- timing


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """(max - min) / median: how noisy the repetitions were."""
    return (max(xs) - min(xs)) / median(xs) if xs and median(xs) > 0 else 0.0


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def round_robin(
    runs: dict[str, Callable[[], object]],
    reps: int,
    warmups: dict[str, Callable[[], object]] | None = None,
    max_seconds: float | None = None,
    min_reps: int = 3,
) -> dict[str, list[float]]:
    """Seconds of each run, ``reps`` times, interleaved (A B C A B C ...) so that a drift of the machine's
    speed is shared by all runs instead of biasing whichever ran last. Each warm-up runs once first.

    With ``max_seconds``, a run whose first repetition shows that ``reps`` of them would take longer gets
    fewer: as many as fit, but at least ``min_reps`` (never more than ``reps``)."""
    for name, warm in (warmups or {}).items():
        if name in runs:
            warm()
    times: dict[str, list[float]] = {name: [] for name in runs}
    planned = dict.fromkeys(runs, reps)
    for rep in range(reps):
        for name, fn in runs.items():
            if rep < planned[name]:
                times[name].append(time_call(fn))
        if rep == 0 and max_seconds is not None:
            planned = {n: max(min(reps, min_reps), min(reps, int(max_seconds // max(t[0], 1e-9))))
                       for n, t in times.items()}
    return times


# ------------------------------------------------------------------------------------------------ machine


def machine_info() -> dict:
    import pytorch_lightning
    import torchattacks

    fields = proc_cpuinfo() or {}
    flags = set(fields.get("flags", "").split())
    cores = fields.get("cpu cores")  # physical cores per socket, where /proc/cpuinfo says
    return {
        "cpu": fields.get("model name") or platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores_per_socket": int(cores) if cores and cores.isdigit() else None,
        "isa": {flag: flag in flags for flag in ISA_FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16_supported": onednn_bf16(),
        "auto_precision": resolve_precision(AUTO, "cpu")[0],  # what `precision: auto` means on this CPU
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "pytorch_lightning": pytorch_lightning.__version__,
        "torchattacks": torchattacks.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def native_bf16(isa: dict[str, bool]) -> bool:
    """Whether the CPU has bf16 arithmetic instructions (AVX-512 BF16 or AMX-BF16)."""
    return bool(isa.get("avx512_bf16") or isa.get("amx_bf16"))


def matmul_rate(dtype: torch.dtype, n_max: int, reps: int, budget_s: float = 1.0) -> dict:
    """GFLOP/s of ``torch.mm`` on two square matrices of ``dtype`` (2 n^3 FLOPs), median of ``reps``.

    n doubles from 256 up to ``n_max`` while one product takes under ``budget_s``: large for fast kernels, and
    bounded in time for slow ones (bf16 without native support can be ~100x slower than fp32)."""
    gen = torch.Generator().manual_seed(0)
    n = min(256, n_max)
    while True:
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        torch.mm(a, b)  # warm-up: packing buffers, oneDNN primitive creation
        if 2 * n > n_max or time_call(functools.partial(torch.mm, a, b)) * 8 > budget_s:  # 8x the work at 2n
            break
        n *= 2
    times = [time_call(functools.partial(torch.mm, a, b)) for _ in range(reps)]
    return {"n": n, "seconds": times, "gflops": 2 * n**3 / median(times) / 1e9, "spread": spread(times)}


# --------------------------------------------------------------------------------------------------- data


@dataclass
class Cifar:
    train_x: torch.Tensor  # uint8 [N, 3, 32, 32]
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @classmethod
    def load(cls, data_dir: str | None = None) -> Cifar:
        return cls(*load_cifar10(resolve_data_dir(data_dir)))

    def test_batch(self, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` test images (after ``offset``) as floats in [0, 1]: the same batch for every method."""
        return self.test_x[offset : offset + n].float().div(255), self.test_y[offset : offset + n].clone()


# ------------------------------------------------------------------------------ the models that are attacked


@dataclass
class TrainRecipe:
    """A short plain-PyTorch training run (SGD + Nesterov, linear warm-up then decay, crop/flip, fp32
    channels_last): enough for attack success rates to mean something, not a converged model."""

    steps: int
    batch_size: int
    lr: float
    label_smoothing: float = 0.1
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.2
    seed: int = 0

    def describe(self) -> str:
        return (f"{self.steps} SGD steps of {self.batch_size} real CIFAR-10 training images "
                f"({self.steps * self.batch_size} images), Nesterov momentum 0.9, peak lr {self.lr}, linear "
                f"warm-up {self.warmup_fraction:.0%} then decay, label smoothing {self.label_smoothing}, "
                f"random crop + flip, fp32 channels_last")


def linear_schedule(total: int, warmup_fraction: float) -> Callable[[int], float]:
    """The ``linear`` schedule of ClassifierModule: per-step warm-up, then linear decay to 0."""
    warmup = max(1, int(warmup_fraction * total))
    return lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))


def train_briefly(arch: str, data: Cifar, recipe: TrainRecipe) -> Classifier:
    """``build_model(arch)`` trained by ``recipe``; returned contiguous, in eval mode."""
    torch.manual_seed(recipe.seed)
    model = build_model(arch).to(memory_format=CL)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True,
                          weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(recipe.steps, recipe.warmup_fraction))
    model.train()
    step, epoch = 0, 0
    while step < recipe.steps:
        batches = TensorBatches(data.train_x, data.train_y, recipe.batch_size, shuffle=True, drop_last=True,
                                seed=recipe.seed, epoch_fn=lambda e=epoch: e)
        for xb, yb in batches:
            if step == recipe.steps:
                break
            x = random_crop_flip(xb.float().div_(255)).contiguous(memory_format=CL)
            loss = F.cross_entropy(model(x), yb, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        epoch += 1
    return model.to(memory_format=torch.contiguous_format).eval()


def load_weights(arch: str, path: str | Path) -> Classifier:
    """A model from a Lightning checkpoint (``model.``-prefixed keys) or a plain ``state_dict`` file."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if "hyper_parameters" in obj and "state_dict" in obj:
        # The suite's own checkpoints: rebuilt from their hyperparameters (the mini configs' whitened stem).
        return load_source(path, arch=arch).model
    state = obj.get("state_dict", obj)
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    model = build_model(arch)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def clean_accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch_size),
                                                                             y.split(batch_size), strict=True))
    return correct / max(1, len(y))
