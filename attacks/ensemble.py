"""Ensembles of classifiers and Nakkiran's non-transferable targeted attack (SPEC section 4.1).

An ensemble maps images ``x`` [B, ...] to the logits of all its members, [M, B, C], always with the members
in eval mode (BatchNorm uses its running statistics and never updates them):

- ``BatchedEnsemble``: members of identical architecture evaluated in one pass with ``torch.func``
  (``stack_module_state`` + ``functional_call`` + ``vmap`` over the stacked weights). It holds a snapshot of
  the members' weights and buffers: later changes to the members are not seen.
- ``LoopEnsemble``: a Python loop over the members; any architectures.
- ``make_ensemble`` picks the batched one when the architectures allow it.

``nakkiran_loss(f, ensemble, y)`` is the per-example loss ``CE(f(x), t) + mean_i CE(f_i(x), y)`` that
``pgd(f, x, t, targeted=True, loss_fn=...)`` minimises: push f to the target t while every ensemble member keeps
the true label y. ``transfer_report`` measures the result against a fresh, independently trained model
(the table of SPEC 4.1).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from attacks.evaluate import _batches, model_device, predict
from attacks.pgd import LossFn, eval_mode, pgd
from common.errors import ConfigError

__all__ = [
    "BatchedEnsemble",
    "Ensemble",
    "LoopEnsemble",
    "architecture_mismatch",
    "make_ensemble",
    "nakkiran_loss",
    "transfer_report",
]


# The layers torch.autocast runs in lower precision (its CPU and CUDA lists: convolutions, linear layers).
_LOWER_PRECISION_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMALIZATION_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class Ensemble(nn.Module):
    """Base class: ``forward(x) -> logits [M, B, C]`` of the M members, always in eval mode."""

    def __len__(self) -> int:
        raise NotImplementedError


def _check_members(models: Sequence[nn.Module]) -> list[nn.Module]:
    models = list(models)
    if not models:
        raise ValueError("an ensemble needs at least one model")
    if not all(isinstance(m, nn.Module) for m in models):
        raise TypeError(f"ensemble members must be nn.Modules, got {[type(m).__name__ for m in models]}")
    return models


def architecture_mismatch(models: Sequence[nn.Module]) -> str | None:
    """None if every model has the architecture of the first (same module tree and layer settings, same
    parameter / buffer names, shapes, dtypes and devices), else a sentence naming the first difference."""
    models = _check_members(models)

    def signature(m: nn.Module) -> dict[str, tuple]:
        return {k: (tuple(v.shape), v.dtype, v.device) for k, v in m.state_dict(keep_vars=True).items()}

    reference, ref_repr = signature(models[0]), repr(models[0])
    for i, model in enumerate(models[1:], start=1):
        if repr(model) != ref_repr:
            return f"member {i} is built differently from member 0 (their module trees / layer settings differ)"
        sig = signature(model)
        if sig != reference:
            key = next(k for k in sorted(set(sig) | set(reference)) if sig.get(k) != reference.get(k))
            return (f"member {i} differs from member 0 in {key!r}: {sig.get(key, 'missing')} vs "
                    f"{reference.get(key, 'missing')} (shape, dtype, device)")
    return None


class BatchedEnsemble(Ensemble):
    """Members of identical architecture evaluated in ONE pass: their weights and buffers are stacked and
    ``vmap`` runs ``functional_call`` of an eval-mode copy of the architecture over them.

    The stacked tensors are a detached snapshot (no parameter gradients; later changes to the members are not
    seen) kept as buffers, so ``.to(device)`` moves them.

    Autocast: ``torch.autocast`` does not reach the convolutions inside ``vmap`` (measured on CPU, torch 2.14;
    pytorch/pytorch#192617), so under an active autocast the ensemble applies autocast's rule for the layers
    that matter itself: every ``nn.Conv*`` / ``nn.Linear`` runs with its input and weights in the autocast dtype,
    normalisation layers compute in fp32 (vmap's batch_norm rule cannot mix a half-precision input with fp32
    statistics), the rest follows the data's dtype.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        models = _check_members(models)
        problem = architecture_mismatch(models)
        if problem is not None:
            raise ConfigError(f"BatchedEnsemble needs members of identical architecture: {problem}. Use "
                             "LoopEnsemble (or make_ensemble, which falls back to it) for mixed architectures")
        params, buffers = stack_module_state(models)
        self._keys: dict[str, list[tuple[str, str]]] = {"params": [], "buffers": []}
        for kind, stacked in (("params", params), ("buffers", buffers)):
            for i, (name, tensor) in enumerate(stacked.items()):
                slot = f"_{kind}_{i}"  # buffer names cannot contain dots
                self.register_buffer(slot, tensor.detach())
                self._keys[kind].append((name, slot))
        # The architecture without storage (meta device), kept out of the submodules so that .to() and
        # .train() never touch it: it stays in eval mode for good.
        base = copy.deepcopy(models[0]).to("meta").eval()
        self._base = (base,)
        self._size = len(models)
        self._amp_dtype: torch.dtype | None = None  # set for the duration of a forward under autocast
        self._lowered = {name for name, m in base.named_modules() if isinstance(m, _LOWER_PRECISION_LAYERS)}
        for name, module in base.named_modules():
            if name in self._lowered:
                module.register_forward_pre_hook(self._to_amp_dtype)
            elif isinstance(module, _NORMALIZATION_LAYERS):
                module.register_forward_pre_hook(self._to_fp32)

    @staticmethod
    def _cast(args: tuple, dtype: torch.dtype) -> tuple:
        return tuple(a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)

    def _to_amp_dtype(self, module: nn.Module, args: tuple) -> tuple | None:
        return None if self._amp_dtype is None else self._cast(args, self._amp_dtype)

    def _to_fp32(self, module: nn.Module, args: tuple) -> tuple | None:
        return None if self._amp_dtype is None else self._cast(args, torch.float32)

    def __len__(self) -> int:
        return self._size

    def _stacked(self, kind: str) -> dict[str, Tensor]:
        return {name: getattr(self, slot) for name, slot in self._keys[kind]}

    def forward(self, x: Tensor) -> Tensor:
        base = self._base[0]
        device_type = x.device.type
        amp_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        params = self._stacked("params")
        if amp_dtype is not None:
            params = {name: p.to(amp_dtype) if name.rpartition(".")[0] in self._lowered and p.is_floating_point()
                      else p for name, p in params.items()}

        def member(params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: Tensor) -> Tensor:
            # Autocast off inside: the casts above and in the pre-hooks are the whole policy, whatever parts of
            # autocast do or do not act under vmap in this torch version.
            with torch.autocast(device_type, enabled=False):
                return functional_call(base, (params, buffers), (inputs,))

        self._amp_dtype = amp_dtype
        try:
            return vmap(member, in_dims=(0, 0, None))(params, self._stacked("buffers"), x)
        finally:
            self._amp_dtype = None


class LoopEnsemble(Ensemble):
    """A Python loop over the members (any architectures), each run in eval mode (its own mode restored)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(_check_members(models))

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, x: Tensor) -> Tensor:
        outputs = []
        for model in self.members:
            with eval_mode(model):
                outputs.append(model(x))
        return torch.stack(outputs)


def make_ensemble(models: Sequence[nn.Module] | Ensemble, batched: bool | None = None) -> Ensemble:
    """An ensemble of ``models``: ``batched=None`` picks ``BatchedEnsemble`` when every member has the same
    architecture and ``LoopEnsemble`` otherwise; True / False force one (True raises for mixed architectures).
    An ``Ensemble`` is returned as is."""
    if isinstance(models, Ensemble):
        return models
    models = _check_members(models)
    if batched is None:
        batched = architecture_mismatch(models) is None
    return BatchedEnsemble(models) if batched else LoopEnsemble(models)


def _at_least_fp32(logits: Tensor) -> Tensor:
    """Upcast autocast's half-precision logits for the loss; float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def nakkiran_loss(target: nn.Module, ensemble: Ensemble | Sequence[nn.Module], y_true: Tensor) -> LossFn:
    """Nakkiran's non-transferable loss for ``pgd(target, x, t, targeted=True, loss_fn=...)``:
    ``loss_fn(target, x, t) = CE(target(x), t) + mean_i CE(f_i(x), y_true)`` per example, shape [B].

    Minimising it pushes the target model to ``t`` while every ensemble member keeps the true label. ``y_true``
    holds the true labels of the batch being attacked (so build one loss per batch). A list of models is
    turned into an ensemble with ``make_ensemble``; build the ensemble once and reuse it when attacking many
    batches (stacking the weights is a copy).
    """
    ensemble = make_ensemble(ensemble)
    if y_true.dim() != 1:
        raise ValueError(f"y_true must hold one label per example, shape (B,), got {tuple(y_true.shape)}")

    def loss_fn(model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
        if model is not target:
            # pgd puts the model it attacks in eval mode: a different one could run with BatchNorm in train mode.
            raise ValueError("nakkiran_loss was built for another target model than the one pgd attacks: pass "
                             "the same module to nakkiran_loss(target, ...) and pgd(target, ...)")
        if len(y_true) != len(x):
            raise ValueError(f"nakkiran_loss holds {len(y_true)} true labels but pgd passed {len(x)} images: "
                             "build one loss per batch with that batch's labels")
        target_ce = F.cross_entropy(_at_least_fp32(model(x)), t, reduction="none")
        logits = _at_least_fp32(ensemble(x))  # [M, B, C]
        labels = y_true.to(logits.device)[:, None].expand(-1, logits.shape[0])  # [B, M]
        keep_ce = F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")  # [B, M]
        return target_ce + keep_ce.mean(dim=1)

    return loss_fn


@torch.no_grad()
def _ensemble_predictions(ensemble: Ensemble, x: Tensor) -> Tensor:
    return ensemble(x).argmax(dim=-1)  # [M, B]


def transfer_report(
    target: nn.Module,
    ensemble: Ensemble | Sequence[nn.Module],
    fresh: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float,
    step_size: float,
    steps: int,
    shift: int = 1,
    batch_size: int = 250,
    use_best: bool = True,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """SPEC table 4.1: plain targeted PGD and the non-transferable attack, both towards ``t = (y + shift) mod C``
    from ``x`` (no random start), measured on the target and on a ``fresh`` independently trained model.

    Returns fractions in [0, 1] over all ``len(x)`` examples (plus ``examples``):
    ``{pgd,non_transferable}_success`` (target predicts t), ``..._transfer`` (fresh predicts t),
    ``..._ensemble_kept_true`` (mean fraction of ensemble members still predicting y), and the chance baselines
    ``clean_target_accuracy`` (target right on clean x) and ``clean_fresh_target_rate`` (fresh predicts t on
    clean x). Batches go to the target's device; ``fresh`` and the ensemble must be on it too.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}")
    ensemble = make_ensemble(ensemble)
    device = model_device(target, x.device)
    attack = {"norm": norm, "eps": eps, "step_size": step_size, "steps": steps, "targeted": True,
              "random_start": False, "use_best": use_best, "autocast_dtype": autocast_dtype,
              "channels_last": channels_last}
    counts: dict[str, float] = {}

    def add(key: str, value: Tensor) -> None:
        counts[key] = counts.get(key, 0.0) + float(value.float().sum())

    for xb, yb in _batches(x, y, batch_size=batch_size, device=device):
        clean_pred = predict(target, xb, batch_size=batch_size)
        with torch.no_grad(), eval_mode(target):
            num_classes = target(xb[:1]).shape[1]
        t = (yb + shift) % num_classes
        add("clean_target_accuracy", clean_pred == yb)
        add("clean_fresh_target_rate", predict(fresh, xb, batch_size=batch_size) == t)
        adversarial = {
            "pgd": pgd(target, xb, t, **attack),
            "non_transferable": pgd(target, xb, t, loss_fn=nakkiran_loss(target, ensemble, yb), **attack),
        }
        for name, x_adv in adversarial.items():
            add(f"{name}_success", predict(target, x_adv, batch_size=batch_size) == t)
            add(f"{name}_transfer", predict(fresh, x_adv, batch_size=batch_size) == t)
            add(f"{name}_ensemble_kept_true", (_ensemble_predictions(ensemble, x_adv) == yb).float().mean(dim=0))
    return {"examples": len(x), **{k: v / len(x) for k, v in sorted(counts.items())}}
