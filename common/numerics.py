"""``precision: auto``: the fastest correct numerics of the device a run is on, chosen when it starts.

``auto`` resolves to ``bf16-mixed`` where the device computes bf16 natively and to ``32-true`` elsewhere:

- CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later);
- CPU: oneDNN reports bf16 support (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``) **and** the CPU has bf16
  arithmetic (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo, where it can be read). The second condition is
  the suite's: oneDNN also reports support on AVX-512 CPUs without bf16 instructions, where it emulates bf16,
  and on the AVX2 machine of docs/NUMERICS.md bf16 ran 12-28x slower than fp32.

A pinned precision is kept; a pinned bf16 on a CPU without native bf16 gets a warning that says so.
"""

from __future__ import annotations

import functools
import warnings

import torch

AUTO = "auto"
BF16, FP32 = "bf16-mixed", "32-true"
BF16_ISA = ("avx512_bf16", "amx_bf16")
SLOW_BF16_WARNING = (
    "precision {precision} on this CPU, which has no native bf16 ({why}): bf16 runs emulated, 12-28x slower than "
    "32-true on the AVX2 machine of docs/NUMERICS.md. Use precision auto (or 32-true) unless you want bf16's rounding")


class SlowPrecisionWarning(UserWarning):
    """A pinned bf16 precision on a device that does not compute bf16 natively."""


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The ISA flags of /proc/cpuinfo; None where it cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16(device_type: str) -> tuple[bool, str]:
    """Whether ``device_type`` ("cpu", "cuda", ...) computes bf16 natively, and why (for the log line)."""
    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        return ok, f"{name}: {'bf16 supported' if ok else 'no bf16'}"
    if device_type != "cpu":
        return False, f"{device_type}: the suite picks fp32 there"
    if not _onednn_bf16():
        return False, "oneDNN reports no bf16 support"
    flags = cpu_flags()
    if flags is None:
        return True, "oneDNN reports bf16 support (CPU flags unreadable)"
    found = [f for f in BF16_ISA if f in flags]
    if not found:
        return False, "oneDNN reports bf16 support, but the CPU has neither avx512_bf16 nor amx_bf16"
    return True, f"oneDNN bf16 with {' and '.join(found)}"


def device_type_of(accelerator: object) -> str:
    """The device type a Trainer's ``accelerator`` argument (a name or an Accelerator) will run on."""
    name = (accelerator if isinstance(accelerator, str) else type(accelerator).__name__).lower()
    name = name.removesuffix("accelerator") or "auto"
    if name == "auto":  # Lightning's order: CUDA, then MPS, then the CPU
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    return "cuda" if name == "gpu" else name


def resolve_precision(precision: object, device_type: str) -> tuple[str | int | None, str]:
    """The precision a run uses (``auto`` resolved for ``device_type``) and a line that says why."""
    ok, why = native_bf16(device_type)
    if precision == AUTO:
        chosen = BF16 if ok else FP32
        return chosen, f"precision auto -> {chosen} on {device_type} ({why})"
    if device_type == "cpu" and str(precision).startswith("bf16") and not ok:
        warnings.warn(SLOW_BF16_WARNING.format(precision=precision, why=why), SlowPrecisionWarning, stacklevel=3)
    return precision, f"precision {precision} (pinned) on {device_type} ({why})"
