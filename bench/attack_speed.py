"""Section 1 (attack throughput next to attack success), the FLOP count of one attack step (section 3) and
the profile of one attack step (section 4).

Every method attacks the same model with the same batch of real CIFAR-10 test images, the same eps, number
of steps and step size, without random start, and returns its last iterate (``use_best=False`` for ours and
for the robustness library; torchattacks always returns the last iterate), so every method does exactly
``steps`` forward + backward passes per image: throughput is comparable work per second.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from attacks.pgd import eval_mode, pgd
from bench.common import CL, median, round_robin, spread
from common.datasets import CIFAR10_MEAN as MEAN
from common.datasets import CIFAR10_STD as STD
from models.fusion import fold_batchnorm


@dataclass(frozen=True)
class Spec:
    """One threat model and attack budget."""

    norm: str
    eps: float
    step_size: float
    steps: int

    @property
    def key(self) -> str:
        return self.norm

    def describe(self) -> str:
        if self.norm == "linf":
            return (f"Linf, eps {self.eps * 255:g}/255, {self.steps} steps of {self.step_size * 255:g}/255, "
                    "no random start")
        return f"L2, eps {self.eps:g}, {self.steps} steps of {self.step_size:g}, no random start"


LINF = Spec("linf", 8 / 255, 2 / 255, 10)
L2 = Spec("l2", 0.5, 0.1, 10)

OURS_FP32 = "ours fp32"
OURS_CL = "ours fp32 + channels_last"
OURS_BF16 = "ours bf16 autocast + channels_last"
OURS_FOLDED = "ours bf16 autocast + channels_last, BatchNorm folded"
TORCHATTACKS = "torchattacks (defaults, fp32)"
ROBUSTNESS = "robustness (MadryLab, fp32)"
OURS = (OURS_FP32, OURS_CL, OURS_BF16, OURS_FOLDED)

Runner = Callable[[Tensor, Tensor], Tensor]

# -------------------------------------------------------------------------------------- the robustness lib


def load_robustness(path: str | None) -> tuple[ModuleType | None, str]:
    """``robustness.attacker`` if it imports (from ``path`` first, if given), and a sentence saying how."""
    if path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module("robustness.attacker")
    except Exception as err:  # any import-time failure is a finding to report, not a crash
        where = f" (with {path} on sys.path)" if path else ""
        hint = "" if path else (" It is not a dependency of the suite; to include it, install it into a throwaway "
                                "directory (`pip install --no-deps --target DIR robustness dill pandas cox "
                                "tensorboardX`) and pass `--robustness-path DIR`.")
        return None, f"not measured: `import robustness.attacker` failed{where}: {type(err).__name__}: {err}.{hint}"
    try:
        from importlib.metadata import version

        ver = version("robustness")
    except Exception:
        ver = "unknown version"
    return module, (f"robustness {ver} imported from `{module.__file__}` (installed with `pip install --no-deps "
                    "--target` outside the project: of its declared dependencies (GPUtil, py3nvml, tables, "
                    "seaborn, ...) only dill, pandas, cox and tensorboardX are needed to import the attacker). "
                    "Its `Attacker.forward` hard-codes `orig_input.cuda()`, which fails without a GPU: for the "
                    "duration of each call `Tensor.cuda` returns the tensor itself, nothing else is changed. "
                    "Called with `should_normalize=False` (our models normalise inside) and `use_best=False`")


@contextlib.contextmanager
def cuda_calls_are_noops() -> Iterator[None]:
    """The robustness library's ``Attacker.forward`` moves the clean input with a hard-coded
    ``orig_input.cuda()``, which fails on a machine without a GPU. For the duration of one call,
    ``Tensor.cuda`` returns the tensor itself; nothing else of the library is changed."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


# ------------------------------------------------------------------------------------------------- runners


def make_runner(method: str, variants: dict[str, nn.Module], spec: Spec, steps: int,
                robustness: ModuleType | None) -> Runner:
    """``run(x, y) -> x_adv`` for one method; ``variants`` holds the same weights contiguous, channels_last, and
    channels_last with BatchNorm folded into the convolutions (models.fusion)."""
    contiguous, channels_last = variants["contiguous"], variants["channels_last"]
    ours = {"norm": spec.norm, "eps": spec.eps, "step_size": spec.step_size, "steps": steps, "use_best": False}
    if method == OURS_FP32:
        return lambda x, y: pgd(contiguous, x, y, **ours)
    if method == OURS_CL:
        return lambda x, y: pgd(channels_last, x, y, channels_last=True, **ours)
    if method == OURS_BF16:
        return lambda x, y: pgd(channels_last, x, y, channels_last=True, autocast_dtype=torch.bfloat16, **ours)
    if method == OURS_FOLDED:
        return lambda x, y: pgd(variants["folded"], x, y, channels_last=True, autocast_dtype=torch.bfloat16, **ours)
    if method == TORCHATTACKS:  # its defaults except random_start (default True), set False to match
        cls = torchattacks.PGD if spec.norm == "linf" else torchattacks.PGDL2
        return cls(contiguous, eps=spec.eps, alpha=spec.step_size, steps=steps, random_start=False)
    if method == ROBUSTNESS:
        if robustness is None:
            raise ValueError("the robustness library is not importable")
        # Our models normalise inside, so the attacker's own normalisation is switched off.
        dataset = SimpleNamespace(mean=torch.tensor(MEAN), std=torch.tensor(STD))
        attacker = robustness.Attacker(contiguous, dataset)
        constraint = {"linf": "inf", "l2": "2"}[spec.norm]

        def run(x: Tensor, y: Tensor) -> Tensor:
            with eval_mode(contiguous), cuda_calls_are_noops():
                return attacker(x, y, constraint=constraint, eps=spec.eps, step_size=spec.step_size,
                                iterations=steps, random_start=False, use_best=False, should_normalize=False)

        return run
    raise ValueError(f"unknown method {method!r}")


@torch.no_grad()
def success(model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor) -> dict:
    """Untargeted success: the fraction misclassified after the attack among the clean-correct images, judged
    by the fp32 model; plus the largest perturbation, to show every method stayed inside its budget."""
    with eval_mode(model):
        clean_ok = model(x).argmax(1) == y
        fooled = model(x_adv).argmax(1) != y
    delta = (x_adv - x).flatten(1)
    return {
        "success_rate": float((fooled & clean_ok).sum() / clean_ok.sum().clamp_min(1)),
        "clean_correct": int(clean_ok.sum()),
        "max_linf": float(delta.abs().max()),
        "max_l2": float(delta.norm(dim=1).max()),
    }


# ------------------------------------------------------------------------------------------------- section 1


def time_methods(runners: dict[str, Runner], warm_runners: dict[str, Runner], x: Tensor, y: Tensor,
                 reps: int, max_seconds: float | None) -> tuple[dict[str, list[float]], dict[str, Tensor]]:
    """Seconds per repetition of each runner on ``(x, y)`` (interleaved, after a warm-up), and its last output."""
    outputs: dict[str, Tensor] = {}

    def keep(m: str) -> None:
        outputs[m] = runners[m](x, y)

    times = round_robin({m: functools.partial(keep, m) for m in runners}, reps,
                        {m: functools.partial(warm, x, y) for m, warm in warm_runners.items()}, max_seconds)
    return times, outputs


def attack_section(models: dict[str, nn.Module], batches: dict[str, tuple[Tensor, Tensor]], specs: list[Spec],
                   methods: list[str], reps: int, warmup_steps: int, robustness: ModuleType | None,
                   max_seconds: float | None = None) -> dict:
    """``{arch: {norm: {method: {...}}}}``: seconds per repetition, image-steps/s (median), spread, success."""
    results: dict = {}
    for arch, model in models.items():
        variants = {"contiguous": model.eval(),
                    "channels_last": copy.deepcopy(model).to(memory_format=CL).eval(),
                    "folded": fold_batchnorm(model)[0].to(memory_format=CL)}
        x, y = batches[arch]
        results[arch] = {}
        for spec in specs:
            runners = {m: make_runner(m, variants, spec, spec.steps, robustness) for m in methods}
            warm_runners = {m: make_runner(m, variants, spec, warmup_steps, robustness) for m in methods}
            times, outputs = time_methods(runners, warm_runners, x, y, reps, max_seconds)
            image_steps = len(x) * spec.steps
            results[arch][spec.key] = {
                m: {"seconds": times[m], "reps": len(times[m]), "image_steps_per_s": image_steps / median(times[m]),
                    "spread": spread(times[m]), **success(model, x, y, outputs[m])}
                for m in methods
            }
    return results


# ------------------------------------------------------------------------------------------ FLOPs, section 3


def attack_step_flops(model: nn.Module, x: Tensor, y: Tensor) -> dict:
    """FLOPs per image of one attack step (forward + backward w.r.t. the input only, as ``pgd`` computes it),
    and of the forward alone, counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    with eval_mode(model):
        with FlopCounterMode(display=False) as forward_counter, torch.no_grad():
            model(x)
        x_in = x.clone().requires_grad_(True)
        with FlopCounterMode(display=False) as step_counter:
            # The model gets a non-leaf view of the input: FlopCounterMode's module hooks cannot handle a leaf
            # input under autograd.grad ("A leaf node was passed to _will_engine_execute_node").
            loss = F.cross_entropy(model(x_in.view_as(x_in)), y, reduction="none").sum()
            torch.autograd.grad(loss, x_in)
    return {"forward": forward_counter.get_total_flops() / len(x), "step": step_counter.get_total_flops() / len(x)}


# ------------------------------------------------------------------------------------------ profile, section 4

# First match wins (names lower-cased); self CPU time is attributed to the op that spent it.
CATEGORIES = (
    ("convolutions (ATen: oneDNN, or its fallback)", "not ours", ("conv",)),
    ("dtype casts, layout copies (autocast, channels_last)", "PyTorch kernels; the numerics are our choice",
     ("aten::to", "aten::_to_copy", "aten::copy_", "aten::contiguous", "aten::clone", "tobackward",
      "tocopybackward", "clonebackward")),
    ("other layers: batch norm, pooling, activations, linear, loss", "not ours",
     ("batch_norm", "batchnorm", "pool", "gelu", "relu", "threshold", "addmm", "aten::mm", "linear",
      "softmax", "nll_loss", "cross_entropy", "aten::t", "aten::max")),
    ("attack arithmetic: step, projection, input checks (attacks/pgd.py)", "ours",
     ("sign", "clamp", "norm", "amax", "aminmax", "where", "aten::sub", "aten::add", "aten::mul", "aten::div",
      "aten::abs", "aten::stack", "item", "_local_scalar_dense", "aten::sum", "aten::ones_like")),
)
OTHER = ("everything else (autograd engine, dispatch, allocation)", "not ours")


def categorize(name: str) -> tuple[str, str]:
    lowered = name.lower()
    for label, owner, patterns in CATEGORIES:
        if any(p in lowered for p in patterns):
            return label, owner
    return OTHER


def profile_step(model: nn.Module, x: Tensor, y: Tensor, spec: Spec, autocast_dtype: torch.dtype | None,
                 rows: int) -> dict:
    """torch.profiler on one attack step of ``pgd`` (channels_last; fp32 or under autocast): the top ops by
    self CPU time, and the step's self CPU time by category."""
    cl_model = copy.deepcopy(model).to(memory_format=CL).eval()

    def step() -> Tensor:
        return pgd(cl_model, x, y, norm=spec.norm, eps=spec.eps, step_size=spec.step_size, steps=1, use_best=False,
                   channels_last=True, autocast_dtype=autocast_dtype)

    step()
    step()  # warm-up: oneDNN primitives and allocator caches
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    averages = prof.key_averages()
    categories: dict[str, dict] = {}
    for event in averages:
        label, owner = categorize(event.key)
        entry = categories.setdefault(label, {"owner": owner, "ms": 0.0})
        entry["ms"] += event.self_cpu_time_total / 1e3
    convs = sorted((e for e in averages if categorize(e.key)[1] == "not ours" and "conv" in e.key.lower()),
                   key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "total_ms": sum(event.self_cpu_time_total for event in averages) / 1e3,
        "top_conv_kernels": [e.key for e in convs[:2]],
        "table": averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=44),
        "categories": categories,
    }
