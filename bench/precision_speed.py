"""fp32 against bf16 autocast on this machine, side by side in one run: a training step and an attack step of the
mini standard config's network (the whitened fast CNN, channels_last, batch 256), and the same with BatchNorm
folded for the attack (models.fusion). Steps are interleaved (round robin) after a warm-up; the figure is the median.

    python bench/precision_speed.py [--reps 7] [--steps 5] [--data-dir ../shared/data] [--out FILE.json]

The issue "Speed" asks which numerics are fastest where; this answers it for the network the mini preset spends
most of its time on, on whatever machine runs it (the machine is described in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attacks.pgd import pgd  # noqa: E402
from bench.common import median, round_robin  # noqa: E402
from common.numerics import bf16_fast_path  # noqa: E402
from datamodules.cifar10 import load_cifar10  # noqa: E402
from models import build_model  # noqa: E402
from models.fusion import fold_batchnorm  # noqa: E402

CL = torch.channels_last


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="training / attack steps per repetition")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path)
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile (inductor) variants of the fp32 and bf16 steps; their compile time "
                        "is reported")
    args = p.parse_args(argv)
    x8, y8, _, _ = load_cifar10(Path(args.data_dir or os.environ.get("BOF_DATA_DIR", "data")) / "")
    x, y = x8[:args.batch].float().div(255), y8[:args.batch].long()
    torch.manual_seed(0)
    model = build_model("fast_cnn", whiten=True)
    model.fit_whitening(x8[:512].float().div(255))
    model = model.to(memory_format=CL)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    xc = x.contiguous(memory_format=CL)

    def train(dtype: torch.dtype | None, net: torch.nn.Module = model) -> None:
        net.train()
        for _ in range(args.steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                loss = F.cross_entropy(net(xc), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    model.eval()
    folded, count = fold_batchnorm(model)
    folded = folded.to(memory_format=CL)

    def attack(net: torch.nn.Module, dtype: torch.dtype | None) -> None:
        pgd(net, x, y, norm="l2", eps=0.5, step_size=0.1, steps=args.steps, use_best=False, channels_last=True,
            autocast_dtype=dtype)

    methods = {"train fp32": lambda: train(None), "train bf16": lambda: train(torch.bfloat16),
               "attack fp32": lambda: attack(model, None), "attack bf16": lambda: attack(model, torch.bfloat16),
               "attack fp32, BN folded": lambda: attack(folded, None),
               "attack bf16, BN folded": lambda: attack(folded, torch.bfloat16)}
    compile_seconds = {}
    if args.compile:  # compiled once each (the first call, timed), then timed as the others
        compiled_train, compiled_attack = torch.compile(model), torch.compile(folded)
        for name, fn in (("train fp32, compiled", lambda: train(None, compiled_train)),
                         ("attack fp32, BN folded, compiled", lambda: attack(compiled_attack, None)),
                         ("train bf16, compiled", lambda: train(torch.bfloat16, compiled_train)),
                         ("attack bf16, BN folded, compiled", lambda: attack(compiled_attack, torch.bfloat16))):
            begin = time.monotonic()
            fn()
            compile_seconds[name] = round(time.monotonic() - begin, 1)
            methods[name] = fn
    start = time.monotonic()
    times = round_robin(methods, args.reps, methods, None)
    images = args.batch * args.steps
    rates = {m: images / median(t) for m, t in times.items()}
    bf16_ok, why = bf16_fast_path("cpu")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "bf16_fast_path": bf16_ok, "why": why},
              "batch": args.batch, "steps_per_rep": args.steps, "reps": args.reps, "bn_folded": count,
              "images_per_s": {m: round(r, 1) for m, r in rates.items()},
              "ratios": {"train bf16 / fp32": rates["train bf16"] / rates["train fp32"],
                         "attack bf16 / fp32": rates["attack bf16"] / rates["attack fp32"],
                         "attack fp32 folded / unfolded": rates["attack fp32, BN folded"] / rates["attack fp32"],
                         "attack bf16 folded / unfolded": rates["attack bf16, BN folded"] / rates["attack bf16"],
                         **({"train compiled / eager (fp32)": rates["train fp32, compiled"] / rates["train fp32"],
                             "attack compiled / eager (fp32, folded)":
                                 rates["attack fp32, BN folded, compiled"] / rates["attack fp32, BN folded"],
                             "train compiled / eager (bf16)": rates["train bf16, compiled"] / rates["train bf16"],
                             "attack compiled / eager (bf16, folded)":
                                 rates["attack bf16, BN folded, compiled"] / rates["attack bf16, BN folded"]}
                            if args.compile else {})},
              "compile_seconds": compile_seconds,
              "seconds": round(time.monotonic() - start, 1),
              "command": "python bench/precision_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
