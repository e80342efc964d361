"""``precision: auto``: the fastest correct numerics of the device a run is on, chosen when it starts.

``auto`` resolves to ``bf16-mixed`` where bf16 is the fast path and to ``32-true`` elsewhere:

- CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later);
- CPU: oneDNN reports bf16 support (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``) **and** the CPU's bf16
  arithmetic was measured faster than fp32 for the suite's networks (docs/NUMERICS.md, bench/precision_speed.py):
  AMX (``amx_bf16``; the Xeon with AMX of 2026-12-07: the fast CNN trains at 2.10x and attacks at 1.74x fp32 +
  channels_last), or ``avx512_bf16`` on an AMD CPU (the AMD EPYC of 2026-12-01: the fast CNN's attack 1.6-2.0x
  fp32 + channels_last). Not on an Intel CPU with ``avx512_bf16`` but no AMX visible (the Xeon of 2026-12-07, whose
  hypervisor hides AMX: oneDNN runs avx512_core_bf16 there, and the fast CNN trains at 0.73x and attacks at 0.81x
  of fp32), nor where oneDNN would emulate bf16 (AVX-512 without bf16 instructions; the AVX2 machine, 12-28x
  slower). Where /proc/cpuinfo cannot be read, oneDNN's word is taken.

A pinned precision is kept; a pinned bf16 on a CPU where it is not the fast path gets a warning that says so.
"""

from __future__ import annotations

import functools
import warnings

import torch

AUTO = "auto"
BF16, FP32 = "bf16-mixed", "32-true"
SLOW_BF16_WARNING = (
    "precision {precision} on this CPU, where bf16 is not the fast path ({why}): emulated bf16 ran 12-28x slower than "
    "32-true on the AVX2 machine of docs/NUMERICS.md, avx512_bf16 without AMX on an Intel Xeon 0.73x (training). "
    "Use precision auto (or 32-true) unless you want bf16's rounding")


class SlowPrecisionWarning(UserWarning):
    """A pinned bf16 precision on a device where bf16 is not the fast path."""


@functools.cache
def proc_cpuinfo() -> dict[str, str] | None:
    """The first CPU's fields of /proc/cpuinfo (``vendor_id``, ``model name``, ``flags``, ``cpu cores``, ...);
    None where it cannot be read (not Linux). The one reader of that file (the benchmarks describe the machine
    with it too)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():  # the blank line after the first processor's block
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    return fields


def cpu_info() -> tuple[str | None, frozenset[str] | None]:
    """The vendor (``vendor_id``) and ISA flags of /proc/cpuinfo; None where they cannot be read."""
    fields = proc_cpuinfo()
    if fields is None:
        return None, None
    flags = fields.get("flags")
    return fields.get("vendor_id"), None if flags is None else frozenset(flags.split())


def cpu_flags() -> frozenset[str] | None:
    return cpu_info()[1]


def cpu_vendor() -> str | None:
    return cpu_info()[0]


def onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions and matmuls natively on this CPU (else it would emulate them)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_fast_path(device_type: str) -> tuple[bool, str]:
    """Whether bf16 is the fast path on ``device_type`` ("cpu", "cuda", ...), and why (for the log line)."""
    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        return ok, f"{name}: {'bf16 supported' if ok else 'no bf16'}"
    if device_type != "cpu":
        return False, f"{device_type}: the suite picks fp32 there"
    if not onednn_bf16():
        return False, "oneDNN reports no bf16 support"
    flags = cpu_flags()
    if flags is None:
        return True, "oneDNN reports bf16 support (CPU flags unreadable)"
    if "amx_bf16" in flags:
        return True, "oneDNN bf16 with amx_bf16 (training measured 2.1x fp32)"
    if "avx512_bf16" not in flags:
        return False, "oneDNN reports bf16 support, but the CPU has neither avx512_bf16 nor amx_bf16: emulated"
    vendor = cpu_vendor()
    if vendor == "AuthenticAMD":
        return True, "oneDNN bf16 with avx512_bf16 on AMD (attack measured 1.6-2.0x fp32)"
    return False, (f"avx512_bf16 without AMX on {vendor or 'an unknown vendor'}: bf16 measured slower than fp32 "
                   "on such a CPU (docs/NUMERICS.md)")


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
    ok, why = bf16_fast_path(device_type)
    if precision == AUTO:
        chosen = BF16 if ok else FP32
        return chosen, f"precision auto -> {chosen} on {device_type} ({why})"
    if device_type == "cpu" and str(precision).startswith("bf16") and not ok:
        warnings.warn(SLOW_BF16_WARNING.format(precision=precision, why=why), SlowPrecisionWarning, stacklevel=3)
    return precision, f"precision {precision} (pinned) on {device_type} ({why})"
