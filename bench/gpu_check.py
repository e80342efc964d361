"""One GPU check, ready before a GPU exists: ``python bench/gpu_check.py`` (under 8 minutes on one GPU).

It writes one JSON file (``--out``, default ``bench/results/gpu_check-<device>-<date>.json``) and prints a
summary:

1. ``matmul``: the device's matrix-multiply rate in bf16 and fp32, measured in this run (the yardstick).
2. ``throughput``: training (images/s) and PGD (image-steps/s) of the paper's networks (ResNet-50, ResNet-18,
   VGG-16) in bf16-mixed and fp32, channels_last, each also as a fraction of the same run's matmul rate of its
   precision (FLOPs per image from ``torch.utils.flop_counter``; pipeline/cost.py's model of a step: 3 forward
   passes).
3. ``pipeline``: one stage of each kind through the real pipeline (``Runner``, ``train.py`` subprocesses) at
   reduced size: train (standard), adversarial train (L2), generation (D_det) and measure (transfer). On a GPU
   the paper configs at the rehearsal's sizes; on a CPU the mini configs at the tiny preset's sizes.
4. ``determinism``: the same seeded training steps and PGD (ResNet-18 and the fast CNN) run twice, by default and under
   ``torch.use_deterministic_algorithms(True)`` with ``cudnn.deterministic``: bitwise equal or not, and any
   operation that refuses to run deterministically (docs/DETERMINISM.md says what to expect).

On a CPU (``--size cpu``, the default without CUDA; CI runs it) every size is tiny: the numbers mean nothing,
the point is that the script works before a GPU is lent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":  # `python bench/gpu_check.py`
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# cuBLAS is deterministic only with a fixed workspace; it must be set before the first cuBLAS call.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ARCHS = ("resnet50", "resnet18", "vgg16")
PRECISIONS = ("bf16-mixed", "32-true")


# Sizes per device kind (our choices): on a GPU enough steps to time the steady state, on a CPU just enough to run.
SIZES = {
    "gpu": {"batch": 256, "warmup": 3, "steps": 10, "attack_steps": 10, "matmul_n": 8192, "det_batch": 128},
    "cpu": {"batch": 4, "warmup": 1, "steps": 2, "attack_steps": 2, "matmul_n": 1024, "det_batch": 8},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def matmul_rate(dtype: torch.dtype, n: int, device: torch.device, reps: int = 5) -> float:
    """FLOP/s of ``torch.mm`` of two n x n matrices (2 n^3 FLOPs), best of ``reps`` after a warm-up."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    return 2 * n**3 / min(timed(lambda: torch.mm(a, b), device) for _ in range(reps))


def autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))


def network(arch: str, device: torch.device) -> torch.nn.Module:
    from models import build_model

    return build_model(arch).to(device, memory_format=torch.channels_last)


def throughput(arch: str, precision: str, size: dict, device: torch.device, rates: dict) -> dict:
    """Training images/s and PGD image-steps/s of ``arch`` in ``precision``, and their share of the matmul rate."""
    from attacks import pgd
    from pipeline.cost import PASSES_PER_STEP, forward_flops

    model = network(arch, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(size["batch"], 3, 32, 32, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (size["batch"],), generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step() -> None:
        with autocast(precision, device):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def train_steps(n: int) -> None:
        model.train()
        for _ in range(n):
            train_step()

    def attack() -> None:
        pgd(model, x, y, norm="l2", eps=0.5, step_size=0.1, steps=size["attack_steps"], use_best=False,
            autocast_dtype=torch.bfloat16 if precision.startswith("bf16") else None, channels_last=True)

    train_steps(size["warmup"])
    train_s = timed(lambda: train_steps(size["steps"]), device)
    attack()
    attack_s = timed(attack, device)
    flops = forward_flops({"arch": arch}) * PASSES_PER_STEP
    rate = rates["bf16" if precision.startswith("bf16") else "fp32"]
    images_s = size["batch"] * size["steps"] / train_s
    steps_s = size["batch"] * size["attack_steps"] / attack_s
    return {"arch": arch, "precision": precision, "batch": size["batch"], "train_images_per_s": images_s,
            "attack_image_steps_per_s": steps_s, "train_fraction_of_matmul": images_s * flops / rate,
            "attack_fraction_of_matmul": steps_s * flops / rate, "flops_per_image_step": flops}


def pipeline_stages(kind: str) -> list:
    """One stage of each kind: train, adversarial train, generation, measure (reduced sizes)."""
    from pipeline.presets import TINY, rehearsal
    from pipeline.stages import ckpt_list, measure_stage, train_stage

    if kind == "gpu":
        root, base, cut, extra = "configs/cifar10", ["configs/cifar10/base.yaml"], (), ()
    else:
        root, base, cut, extra = "configs/mini", ["configs/mini/base.yaml"], TINY, ("--model.init_args.steps", "2")
    stages = [
        train_stage("standard", f"{root}/standard.yaml", *cut, base=base),
        train_stage("adversarial_l2", f"{root}/adversarial_l2.yaml", *cut, *extra, base=base),
        train_stage("d_det", f"{root}/d_det.yaml", *cut, "--data.init_args.cache_dir", "{out}/constructed",
                    "--data.init_args.sources", ckpt_list("standard"), base=base, deps=["standard"]),
        measure_stage("transfer", "transfer", "--target", "{ckpt:standard}", "--ensemble", "{ckpt:adversarial_l2}",
                      "--fresh", "{ckpt:d_det}", "--examples", "20", "--steps", "2",
                      deps=["standard", "adversarial_l2", "d_det"]),
    ]
    return rehearsal(stages) if kind == "gpu" else stages


def run_pipeline(kind: str, out: Path, device: torch.device) -> dict:
    from pipeline.runner import Runner

    extra = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"] if device.type == "cuda" else []
    records = Runner(pipeline_stages(kind), out, preset=f"gpu-check-{kind}", extra_args=extra,
                     echo=lambda line: print(f"  {line}")).run()
    return {name: {"kind": r["kind"], "seconds": r["timings"], "results": r["results"]} for name, r in records.items()}


def determinism(size: dict, device: torch.device) -> dict:
    """The same seeded steps twice per mode: are the weights and a PGD result bitwise equal?"""

    def trial(arch: str) -> tuple[torch.Tensor, torch.Tensor]:
        from attacks import pgd

        torch.manual_seed(0)
        model = network(arch, device)
        gen = torch.Generator().manual_seed(1)
        x = torch.rand(size["det_batch"], 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (size["det_batch"],), generator=gen).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights = torch.cat([p.detach().flatten().float() for p in model.parameters()])
        x_adv = pgd(model, x, y, norm="l2", eps=0.5, step_size=0.1, steps=3)
        return weights.cpu(), x_adv.cpu()

    found = {}
    for arch, mode in [(a, m) for a in ("resnet18", "fast_cnn") for m in ("default", "deterministic")]:
        strict = mode == "deterministic"
        torch.use_deterministic_algorithms(strict)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = strict, False
        try:
            (w1, a1), (w2, a2) = trial(arch), trial(arch)
            found[f"{arch}/{mode}"] = {"weights_bitwise_equal": bool(torch.equal(w1, w2)),
                           "weights_max_abs_diff": float((w1 - w2).abs().max()),
                           "pgd_bitwise_equal": bool(torch.equal(a1, a2)),
                           "pgd_max_abs_diff": float((a1 - a2).abs().max())}
        except RuntimeError as err:  # an op without a deterministic kernel says which it is
            found[f"{arch}/{mode}"] = {"error": str(err).splitlines()[0]}
        finally:
            torch.use_deterministic_algorithms(False)
            torch.backends.cudnn.deterministic = False
    found["settings"] = {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                         "cudnn_benchmark": False}
    return found


def device_description(device: torch.device) -> dict:
    from bench.common import machine_info

    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())
    return {**info, "host": machine_info()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="gpu: real sizes; cpu: tiny (default: gpu if CUDA is available)")
    p.add_argument("--out", default=None, help="the results file (default: bench/results/gpu_check-...json)")
    p.add_argument("--work", default=None, help="folder of the pipeline stages (default: beside --out)")
    p.add_argument("--skip", nargs="*", default=[], choices=["throughput", "pipeline", "determinism"])
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = args.size or ("gpu" if device.type == "cuda" else "cpu")
    size = SIZES[kind]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M")
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu_check-{device.type}-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or out.with_suffix(""))
    started = time.perf_counter()
    results: dict = {"command": " ".join(["python bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
                     "size": kind, "sizes": size, "machine": device_description(device)}

    def save() -> None:
        results["seconds"] = round(time.perf_counter() - started, 1)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(out)  # a reader never sees half a file; a section that fails leaves the earlier ones

    bf16_ok = device.type == "cpu" or torch.cuda.is_bf16_supported()
    rates = {"fp32": matmul_rate(torch.float32, size["matmul_n"], device)}
    rates["bf16"] = matmul_rate(torch.bfloat16, size["matmul_n"], device) if bf16_ok else float("nan")
    results["matmul_tflops"] = {k: v / 1e12 for k, v in rates.items()}
    print(f"matmul: fp32 {rates['fp32'] / 1e12:.2f} TFLOP/s, bf16 {rates['bf16'] / 1e12:.2f} TFLOP/s")
    save()
    if "throughput" not in args.skip:
        results["throughput"] = []
        for arch in ARCHS:
            for precision in PRECISIONS if bf16_ok else ("32-true",):
                row = throughput(arch, precision, size, device, rates)
                results["throughput"].append(row)
                print(f"{arch:>9} {precision:>10}: train {row['train_images_per_s']:9.1f} img/s "
                      f"({row['train_fraction_of_matmul']:.0%} of matmul), PGD {row['attack_image_steps_per_s']:9.1f} "
                      f"img-steps/s ({row['attack_fraction_of_matmul']:.0%})")
                save()
    if "determinism" not in args.skip:
        results["determinism"] = determinism(size, device)
        print(f"determinism: {json.dumps(results['determinism'])}")
        save()
    if "pipeline" not in args.skip:
        print(f"pipeline ({kind} sizes) in {work}:")
        results["pipeline"] = run_pipeline(kind, work, device)
        save()
    save()
    print(f"wrote {out} in {results['seconds']} s")
    return results


if __name__ == "__main__":
    main()
