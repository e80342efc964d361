"""Projected gradient descent (PGD) under an L2 or Linf budget, following the MadryLab ``robustness`` library.

One engine serves every experiment of the suite: untargeted attacks (robust accuracy, adversarial training),
targeted attacks (D_rand / D_det), custom losses (Nakkiran's ensemble loss) and unconstrained L2 descent
(representation inversion for D_R / D_NR, ``eps=math.inf``).

Conventions (SPEC section 0):
- Images are in pixel units, inside ``bounds`` (default [0, 1]); normalisation is a layer of the model.
- L2 step ``x <- x +/- s * g / ||g||_2`` per example, Linf step ``x <- x +/- s * sign(g)`` ("+" ascends
  the loss for an untargeted attack, "-" descends it for a targeted one); then project onto the eps-ball
  around the clean input and clamp to ``bounds``.
- The model runs in eval mode; gradients are taken with respect to the input only (``torch.autograd.grad``),
  so parameter ``.grad`` and BatchNorm statistics are never touched.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import ConfigError

NORMS = ("l2", "linf")
RANDOM_STARTS = (False, True, "ball", "sphere")
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]

_INFERENCE_MODE_ERROR = (
    "pgd() was called under torch.inference_mode(), where no gradient can be computed (torch.enable_grad() "
    "cannot undo inference mode). Lightning runs validate/test under inference mode by default: "
    "create the trainer with Trainer(inference_mode=False). Outside Lightning use torch.no_grad() instead."
)


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__}, not a logits tensor; pass loss_fn= to pgd() to say "
            "how to turn its output into a per-example loss"
        )
    return out


def cross_entropy_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The default attack loss: per-example cross-entropy of ``model(x)`` against labels ``y``."""
    return F.cross_entropy(_logits(model, x), y, reduction="none")


# ----------------------------------------------------------------------------------------------- validation


def check_attack_args(
    norm: str,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool | str = False,
    bounds: tuple[float, float] | None = None,
    *,
    fix: str | None = None,
) -> None:
    """Raise a ValueError naming the problem (and the fix) for an invalid attack specification.

    ``bounds`` (the pixel range the attack clamps to; None skips the Linf-vs-range check) should be those the
    attack will run with: ``pgd``'s default is ``(0.0, 1.0)``. ``fix``, e.g. ``"model.init_args"``, is where the
    arguments are set; each message then ends with ``; fix <fix>.<argument>``."""

    def refuse(argument: str, message: str) -> ConfigError:
        return ConfigError(f"{message}; fix {fix}.{argument}" if fix else message)

    if norm not in NORMS:
        raise refuse("norm", f"unknown norm {norm!r}; use one of {NORMS}")
    if not isinstance(eps, numbers.Real) or math.isnan(eps) or eps <= 0:
        raise refuse(
            "eps",
            f"eps must be a positive number (math.inf allowed for unconstrained descent), got {eps!r}; "
            "for clean accuracy do not attack at all",
        )
    if not isinstance(step_size, numbers.Real) or not math.isfinite(step_size) or step_size <= 0:
        raise refuse("step_size", f"step_size must be a positive finite number, got {step_size!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise refuse("steps", f"steps must be a non-negative int (0 returns the starting point), got {steps!r}")
    if random_start not in RANDOM_STARTS:
        raise refuse("random_start", f"random_start must be one of {RANDOM_STARTS}, got {random_start!r}")
    if random_start and math.isinf(eps):
        raise refuse("eps", "a random start needs a finite eps: no uniform distribution on an infinite ball")
    if random_start == "sphere" and norm != "l2":
        raise refuse("random_start", "random_start='sphere' is for norm='l2' only; use True for a uniform Linf start")
    if bounds is not None:
        low, high = bounds
        if not low < high:
            raise refuse("bounds", f"bounds must be (low, high) with low < high, got {bounds!r}")
        if norm == "linf" and eps > high - low:
            raise refuse(
                "eps",
                f"Linf eps={eps} exceeds the width {high - low} of bounds {bounds}: the budget is vacuous. "
                f"Epsilons are in pixel units of [0, 1] images; did you mean eps={eps}/255?",
            )


def _prepare_inputs(x: Tensor, y: Tensor, bounds: tuple[float, float] | None) -> tuple[Tensor, Tensor]:
    """Detached, autograd-usable copies of the inputs, with the iterate in at least fp32."""
    if not x.is_floating_point():
        raise ConfigError(f"x must be a floating tensor of images in pixel units, got dtype {x.dtype}")
    if x.dim() == 0 or y.shape[:1] != x.shape[:1]:
        raise ConfigError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must share the batch dimension")
    # Inference tensors (made under torch.inference_mode) cannot be saved for backward: copy them.
    x = x.clone() if x.is_inference() else x.detach()
    y = y.clone() if y.is_inference() else y.detach()
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # the iterate stays fp32 even with autocast
    if not x.numel():
        return x, y
    # One device sync for both checks: min and max propagate NaN and show infinities.
    lo, hi = torch.stack(torch.aminmax(x)).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError("x contains NaN or inf values")
    if bounds is not None:
        low, high = bounds
        if lo < low - 1e-5 or hi > high + 1e-5:
            raise ConfigError(
                f"x has values in [{lo:.3g}, {hi:.3g}], outside bounds {bounds}. Inputs must be images in "
                "pixel units with the normalisation inside the model (otherwise eps changes units); "
                "pass bounds=None to disable clamping"
            )
    return x, y


# --------------------------------------------------------------------------------------------- model state


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore every submodule's own previous mode afterwards (also on error)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


# ------------------------------------------------------------------------------------------- the geometry


def _per_example(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) vector to broadcast against a (B, ...) tensor."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _l2_norms(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


def _l2_normalize(g: Tensor) -> Tensor:
    """``g / ||g||_2`` per example; zero gradients stay zero."""
    # Scale by the largest entry first: tiny gradients (saturated softmax) would underflow when squared.
    peak = g.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(g.dtype).tiny)
    g = g / _per_example(peak, g)
    return g / _per_example(_l2_norms(g).clamp_min(1e-12), g)


def random_delta(
    x: Tensor, *, norm: str, eps: float, kind: bool | str, generator: torch.Generator | None = None
) -> Tensor:
    """A random perturbation for each example of ``x`` (not yet clamped to the bounds).

    - Linf: uniform in the box ``[-eps, eps]^d``.
    - L2, ``kind`` True or "ball": uniform in the ball: Gaussian direction, radius ``eps * U^(1/d)``.
    - L2, ``kind`` "sphere": exactly on the sphere of radius eps (the robustness library's start).

    The noise is drawn on the generator's device (so a CPU generator reproduces the same start for any
    device of ``x``) and then moved to ``x``'s device.
    """
    device = generator.device if generator is not None else x.device
    shape, dtype = x.shape, x.dtype
    if norm == "linf":
        noise = torch.rand(shape, generator=generator, device=device, dtype=dtype) * 2 - 1
        return (eps * noise).to(x.device)
    direction = _l2_normalize(torch.randn(shape, generator=generator, device=device, dtype=dtype))
    if kind == "sphere":
        return (eps * direction).to(x.device)
    dim = x[0].numel()
    radius = eps * torch.rand(shape[0], generator=generator, device=device, dtype=dtype) ** (1.0 / dim)
    return (_per_example(radius, direction) * direction).to(x.device)


def _step(x_adv: Tensor, grad: Tensor, *, norm: str, step_size: float) -> Tensor:
    """One ascent step on the loss whose gradient is ``grad`` (the caller flips the sign to descend)."""
    direction = grad.sign() if norm == "linf" else _l2_normalize(grad)
    return x_adv + step_size * direction


def _project(
    x_adv: Tensor, x0: Tensor, *, norm: str, eps: float, bounds: tuple[float, float] | None
) -> Tensor:
    """Project onto the eps-ball around ``x0``, then clamp to the bounds (this only shrinks the perturbation,
    as ``x0`` is inside them)."""
    delta = x_adv - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif math.isfinite(eps):
        scale = (eps / _l2_norms(delta).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * _per_example(scale, delta)
    x_adv = x0 + delta
    return x_adv if bounds is None else x_adv.clamp(*bounds)


# ------------------------------------------------------------------------------------------------ the loop


def _make_objective(
    model: nn.Module, loss_fn: LossFn | None, autocast_dtype: torch.dtype | None, channels_last: bool
) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]:
    """``objective(x_adv, y) -> (per-example fp32 loss, logits or None)`` with the forward options applied."""

    def objective(x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        # The conversion is part of the graph, so the gradient still arrives at the (contiguous) iterate.
        x_in = x_adv.contiguous(memory_format=torch.channels_last) if channels_last else x_adv
        autocast = (
            torch.autocast(device_type=x_adv.device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            if loss_fn is None:
                logits = _logits(model, x_in)  # kept for the early-stop check
                losses = F.cross_entropy(logits, y, reduction="none")
            else:
                logits, losses = None, loss_fn(model, x_in, y)
        if losses.shape != x_adv.shape[:1]:
            raise ConfigError(
                f"the attack loss must be per example, shape ({x_adv.shape[0]},), got {tuple(losses.shape)}; "
                "use reduction='none'"
            )
        return losses.float(), logits

    return objective


def _all_successful(
    model: nn.Module, x_adv: Tensor, y: Tensor, logits: Tensor | None, targeted: bool
) -> bool:
    """Targeted: every prediction equals its target. Untargeted: every prediction differs from its label."""
    if logits is None:  # a custom loss gives no logits: one extra forward
        logits = _logits(model, x_adv)
    hits = logits.argmax(dim=1) == y
    return bool(hits.all() if targeted else (~hits).all())


def _keep_best(
    losses: Tensor, x_adv: Tensor, best_loss: Tensor | None, best_x: Tensor | None, targeted: bool
) -> tuple[Tensor, Tensor]:
    """Per example, keep the iterate with the lowest (targeted) or highest (untargeted) loss so far."""
    if best_loss is None or best_x is None:
        return losses.detach().clone(), x_adv.detach().clone()
    better = losses < best_loss if targeted else losses > best_loss
    best_x = torch.where(_per_example(better, x_adv), x_adv.detach(), best_x)
    return torch.where(better, losses.detach(), best_loss), best_x


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    step_size: float,
    steps: int,
    targeted: bool = False,
    random_start: bool | str = False,
    use_best: bool = True,
    loss_fn: LossFn | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    early_stop: bool = False,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Tensor:
    """Projected gradient descent; returns adversarial inputs of the same shape and dtype as ``x``.

    Args:
        model: maps inputs to logits (or anything ``loss_fn`` understands). Put in eval mode for the attack;
            every submodule's previous mode is restored afterwards. Pass the bare module, not a DDP wrapper.
        x: clean inputs ``(B, ...)`` in pixel units inside ``bounds``.
        y: labels ``(B,)``; for a targeted attack, the targets. With ``loss_fn``, whatever it expects.
        norm: "l2" or "linf".
        eps: radius of the ball around ``x``; ``math.inf`` means unconstrained (only ``bounds`` clamp).
        step_size: L2 length (or Linf size) of each step.
        steps: number of gradient steps; 0 returns the starting point (``x`` or its random perturbation).
        targeted: minimise the loss (move towards ``y``) instead of maximising it.
        random_start: False (start at ``x``); True / "ball": uniform in the L2 ball or Linf box;
            "sphere": on the L2 sphere, as the robustness library.
        use_best: return each example's best-loss iterate (the start and the final iterate included)
            instead of the last one.
        loss_fn: ``loss_fn(model, x_adv, y) -> (B,)`` per-example loss; default cross-entropy.
        bounds: valid input range, or None for no clamping.
        early_stop: stop as soon as every example is successful (untargeted: ``argmax != y``; targeted:
            ``argmax == y``). With ``use_best`` the best-loss iterate is still what is returned.
        generator: source of the random start, for reproducibility.
        autocast_dtype: e.g. ``torch.bfloat16``: run the forward under ``torch.autocast``; the iterate
            stays fp32.
        channels_last: feed the model channels_last inputs (4D inputs only).

    Raises:
        RuntimeError: under ``torch.inference_mode`` (use ``Trainer(inference_mode=False)``).
        ValueError: invalid arguments, non-finite inputs, inputs outside ``bounds``.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(_INFERENCE_MODE_ERROR)
    check_attack_args(norm, eps, step_size, steps, random_start, bounds)
    if channels_last and x.dim() != 4:
        raise ConfigError(f"channels_last needs 4D (B, C, H, W) inputs, got shape {tuple(x.shape)}")
    x0, y = _prepare_inputs(x, y, bounds)

    x_adv = x0
    if random_start:
        x_adv = x0 + random_delta(x0, norm=norm, eps=eps, kind=random_start, generator=generator)
        x_adv = x_adv if bounds is None else x_adv.clamp(*bounds)
    if steps == 0:
        return x_adv.to(x.dtype, copy=True)

    objective = _make_objective(model, loss_fn, autocast_dtype, channels_last)
    sign = -1.0 if targeted else 1.0  # descend the loss towards the target, ascend it away from the label
    best_loss = best_x = None
    # enable_grad: callers may be under torch.no_grad() (validation); the model only sees eval mode.
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            losses, logits = objective(x_adv, y)
            if use_best:
                best_loss, best_x = _keep_best(losses, x_adv, best_loss, best_x, targeted)
            if early_stop:
                with torch.no_grad():
                    if _all_successful(model, x_adv, y, logits, targeted):
                        break
            # Gradient w.r.t. the input only: parameter .grad stays untouched (safe inside training_step).
            (grad,) = torch.autograd.grad(sign * losses.sum(), x_adv)
            with torch.no_grad():
                x_adv = _project(
                    _step(x_adv, grad, norm=norm, step_size=step_size), x0, norm=norm, eps=eps, bounds=bounds
                )
        else:  # no early stop: the final iterate is a candidate too
            if use_best:
                with torch.no_grad():
                    losses, _ = objective(x_adv, y)
                best_loss, best_x = _keep_best(losses, x_adv, best_loss, best_x, targeted)
    result = best_x if use_best else x_adv
    return result.detach().to(x.dtype, copy=True)  # never alias the caller's x


def fgsm_rs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    norm: str = "linf",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    targeted: bool = False,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Tensor:
    """FGSM with a uniform random start (Wong, Rice & Kolter 2020, "Fast is better than free").

    One step of size ``alpha`` (default ``1.25 * eps``, the paper's choice) from a point drawn uniformly in
    the Linf box (or, with ``norm="l2"``, the L2 ball), projected back onto the eps-ball and into the bounds.
    """
    alpha = 1.25 * eps if alpha is None else alpha
    return pgd(
        model,
        x,
        y,
        norm=norm,
        eps=eps,
        step_size=alpha,
        steps=1,
        targeted=targeted,
        random_start=True,
        use_best=False,
        loss_fn=loss_fn,
        bounds=bounds,
        generator=generator,
        autocast_dtype=autocast_dtype,
        channels_last=channels_last,
    )


@dataclass(frozen=True)
class AttackConfig:
    """A PGD specification, validated at construction (with its ``bounds``); ``run`` applies it (extra keywords
    go to ``pgd``)."""

    norm: str
    eps: float
    step_size: float
    steps: int
    random_start: bool | str = False
    use_best: bool = True
    bounds: tuple[float, float] | None = (0.0, 1.0)  # pgd's default: the pixel box; None for no clamping

    def __post_init__(self) -> None:
        # With the bounds the attack runs with, so a vacuous Linf eps is refused here, not at the first batch.
        check_attack_args(self.norm, self.eps, self.step_size, self.steps, self.random_start, self.bounds)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, **kwargs) -> Tensor:
        return pgd(model, x, y, **{**asdict(self), **kwargs})
