"""Benchmarks of the suite (issue 7): one command measures everything and writes BENCHMARKS.md.

    python bench/run.py                 # the full benchmark (run it on a quiet machine)
    python bench/run.py --quick         # a smoke run: tiny batches, 1 repetition (numbers mean nothing)
    python bench/run.py --out PATH      # write the report elsewhere

Sections: 1. attack throughput and success (ours / torchattacks / robustness, fast CNN and ResNet-18);
2. training throughput (Lightning vs a plain loop, standard and adversarial); 3. efficiency against the
measured matrix-multiply rate; 4. the issue's targets, with a torch.profiler table of one attack step;
5. Nakkiran's ensemble loss, batched (vmap) vs a loop over the models; 6. dataset generation through the
suite's engine, 1 process vs 2. Every figure is a median over ``--reps`` repetitions after a warm-up, and
every ratio compares figures of the same run. The attacked models are trained briefly inside the run on real
CIFAR-10, or loaded with ``--checkpoint ARCH=PATH`` (``--save-checkpoints runs/bench`` keeps trained ones for
that); ``fast_cnn=PATH`` is also the source model of section 6. Data: ``--data-dir``, else ``$BOF_DATA_DIR``,
else ./data.
The MadryLab ``robustness`` library is optional: ``--robustness-path DIR`` (or ``$BOF_ROBUSTNESS_PATH``) adds a
directory holding it to sys.path, e.g. one made with ``pip install --no-deps --target DIR robustness dill
pandas cox tensorboardX`` (never a dependency of the suite).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/run.py` puts bench/ first on sys.path; the repository root is what the imports need.
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # torch.profiler: no device-probe chatter on a CPU-only machine

import torch  # noqa: E402

from bench import attack_speed, common, ensemble_speed, generation_speed, report, train_speed  # noqa: E402

ARCHS = ("fast_cnn", "resnet18")
SECTIONS = ("attacks", "training", "hardware", "profile", "ensemble", "generation")
ENV_SHOWN = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BOF_DATA_DIR", "BOF_ROBUSTNESS_PATH")


@dataclass
class Settings:
    """Every size of the run; ``--quick`` shrinks them all."""

    reps: int = 5
    attack_batch: dict = None  # arch -> images per attack batch
    attack_steps: int = 10
    attack_warmup_steps: int = 1
    max_figure_seconds: float = 400.0  # a slower figure gets fewer repetitions, but at least 3
    recipes: dict = None  # arch -> common.TrainRecipe
    eval_images: int = 1000
    train_batch: int | None = None  # None: the mini configs' batch size (256)
    train_warmup: int = 3
    train_batches: int = 10
    matmul_n: int = 2048
    profile_rows: int = 10
    stats_images: int = 512  # training images fitting the whitening stem and BatchNorm of untrained fast CNNs
    ensemble_ks: tuple = (3, 10)
    ensemble_batch: int = 250
    generation_images: int = 500  # 2 x 250: one generation batch (the configs' 250) per process
    generation_batch: int = 250
    generation_steps: int = 10  # per image, both recipes (the mini configs: attack 10, inversion 20 / 100)
    generation_reps: int = 3  # keeps the section under ~3 min on 2 cores

    @classmethod
    def full(cls) -> Settings:
        return cls(attack_batch={"fast_cnn": 256, "resnet18": 32},
                   recipes={"fast_cnn": common.TrainRecipe(steps=40, batch_size=256, lr=0.05),
                            "resnet18": common.TrainRecipe(steps=200, batch_size=64, lr=0.05)})

    @classmethod
    def quick(cls) -> Settings:
        return cls(reps=1, attack_batch={"fast_cnn": 16, "resnet18": 4}, attack_steps=2, attack_warmup_steps=1,
                   recipes={"fast_cnn": common.TrainRecipe(steps=2, batch_size=32, lr=0.2),
                            "resnet18": common.TrainRecipe(steps=1, batch_size=8, lr=0.1)},
                   eval_images=200, train_batch=32, train_warmup=1, train_batches=2, matmul_n=256,
                   stats_images=32, ensemble_batch=8, generation_images=16, generation_batch=8, generation_steps=2,
                   generation_reps=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="report path (default: BENCHMARKS.md)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 repetition")
    p.add_argument("--update", type=Path, metavar="JSON",
                   help="start from the results of an earlier run (its --json) and rerun only --sections: the report "
                        "then mixes two runs, which its header lists")
    p.add_argument("--reps", type=int, help="repetitions per figure (default 5, generation 3; 1 with --quick)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-bin/ (default $BOF_DATA_DIR, else ./data)")
    p.add_argument("--models", default=",".join(ARCHS), help=f"attacked models, comma-separated from {ARCHS}")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"sections to run, from {SECTIONS}")
    p.add_argument("--batch", type=int, help="attack batch for the fast CNN (default 256)")
    p.add_argument("--resnet-batch", type=int, help="attack batch for ResNet-18 (default 32: bf16 is slow here)")
    p.add_argument("--max-figure-seconds", type=float,
                   help="a figure whose repetitions would take longer gets fewer, but at least 3 (default 400)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="ARCH=PATH",
                   help="attack these weights instead of training briefly (Lightning .ckpt or state_dict); "
                        "fast_cnn=PATH is also the generation section's source model")
    p.add_argument("--save-checkpoints", type=Path, metavar="DIR",
                   help="save the briefly trained models here (reuse them with --checkpoint)")
    p.add_argument("--robustness-path", default=os.environ.get("BOF_ROBUSTNESS_PATH"),
                   help="directory holding the robustness package (default $BOF_ROBUSTNESS_PATH)")
    p.add_argument("--json", type=Path, help="also write the raw results dict as JSON here")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.sections = [s for s in args.sections.split(",") if s]
    for name, allowed, what in ((args.models, ARCHS, "model"), (args.sections, SECTIONS, "section")):
        if unknown := set(name) - set(allowed):
            p.error(f"unknown {what}(s) {sorted(unknown)}; choose from {allowed}")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings.quick() if args.quick else Settings.full()
    batch = dict(s.attack_batch)
    batch["fast_cnn"] = args.batch or batch["fast_cnn"]
    batch["resnet18"] = args.resnet_batch or batch["resnet18"]
    return replace(s, reps=args.reps or s.reps, attack_batch=batch, generation_reps=args.reps or s.generation_reps,
                   max_figure_seconds=args.max_figure_seconds or s.max_figure_seconds)


def command_line() -> str:
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ENV_SHOWN if os.environ.get(k)]
    return " ".join([*env, "python", shlex.join(sys.argv)])


# ----------------------------------------------------------------------------------------------- sections


def checkpoints(args: argparse.Namespace) -> dict[str, str]:
    """``--checkpoint ARCH=PATH`` as {arch: path}."""
    return dict(item.split("=", 1) for item in args.checkpoint)


def prepare_models(args: argparse.Namespace, s: Settings, data: common.Cifar) -> tuple[dict, dict]:
    """The attacked models (trained briefly, or loaded) and what was done to get each."""
    given = checkpoints(args)
    models, info = {}, {}
    eval_x, eval_y = data.test_batch(s.eval_images)
    for arch in args.models:
        start = time.perf_counter()
        if arch in given:
            models[arch] = common.load_weights(arch, given[arch])
            source = f"loaded from `{given[arch]}`"
        else:
            recipe = s.recipes[arch]
            models[arch] = common.train_briefly(arch, data, recipe)
            source = f"trained in this run: {recipe.describe()}"
            if args.save_checkpoints:
                args.save_checkpoints.mkdir(parents=True, exist_ok=True)
                torch.save(models[arch].state_dict(), args.save_checkpoints / f"{arch}.pt")
        seconds = time.perf_counter() - start
        info[arch] = {"source": source, "seconds": seconds,
                      "clean_accuracy": common.clean_accuracy(models[arch], eval_x, eval_y),
                      "eval_images": len(eval_y)}
        print(f"[models] {arch}: {source} ({seconds:.0f} s), clean accuracy "
              f"{info[arch]['clean_accuracy']:.3f} on {len(eval_y)} test images", flush=True)
    return models, info


def run_attacks(models: dict, s: Settings, data: common.Cifar, robustness) -> tuple[dict, list]:
    specs = [replace(attack_speed.LINF, steps=s.attack_steps), replace(attack_speed.L2, steps=s.attack_steps)]
    methods = [*attack_speed.OURS, attack_speed.TORCHATTACKS] + ([attack_speed.ROBUSTNESS] if robustness else [])
    # Test images from offset 1000 on: disjoint from the clean-accuracy images above.
    batches = {arch: data.test_batch(s.attack_batch[arch], offset=1000) for arch in models}
    results = attack_speed.attack_section(models, batches, specs, methods, s.reps, s.attack_warmup_steps,
                                          robustness, s.max_figure_seconds)
    for arch, by_norm in results.items():
        for norm, by_method in by_norm.items():
            for method, r in by_method.items():
                print(f"[attacks] {arch} {norm} {method}: {r['image_steps_per_s']:.1f} image-steps/s, "
                      f"success {r['success_rate']:.3f}", flush=True)
    return results, specs


def run_hardware(models: dict, s: Settings, data: common.Cifar) -> dict:
    matmul = {name: common.matmul_rate(dtype, s.matmul_n, max(5, s.reps))
              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    x, y = data.test_batch(8, offset=1000)
    flops = {arch: attack_speed.attack_step_flops(model, x, y) for arch, model in models.items()}
    for name, r in matmul.items():
        print(f"[hardware] mm {name} n={r['n']}: {r['gflops']:.1f} GFLOP/s", flush=True)
    for arch, f in flops.items():
        print(f"[hardware] {arch}: {f['step'] / 1e6:.1f} MFLOP per image-step ({f['forward'] / 1e6:.1f} forward)",
              flush=True)
    return {"matmul": matmul, "flops": flops}


def run_profile(models: dict, s: Settings, data: common.Cifar) -> dict:
    arch = "fast_cnn" if "fast_cnn" in models else next(iter(models))
    x, y = data.test_batch(s.attack_batch[arch], offset=1000)
    spec = attack_speed.LINF
    profiles = {name: attack_speed.profile_step(models[arch], x, y, spec, dtype, s.profile_rows)
                for name, dtype in (("fp32", None), ("bf16", torch.bfloat16))}
    for name, p in profiles.items():
        print(f"[profile] {arch} one {spec.norm} step, {name}: {p['total_ms']:.1f} ms self CPU", flush=True)
    return {"arch": arch, "batch": len(y), "spec": replace(spec, steps=1).describe(), "runs": profiles}


def run_ensemble(s: Settings, data: common.Cifar) -> dict:
    """bench/ensemble_speed.py on real images, with the mini configs' members: whitened fast CNNs, channels_last."""
    inputs = data.test_batch(s.ensemble_batch, offset=1000)
    stats_images = data.train_x[: s.stats_images].float().div(255)
    runs = ensemble_speed.ensemble_speed(s.ensemble_ks, reps=s.reps, channels_last=True, inputs=inputs, whiten=True,
                                         stats_images=stats_images)
    return {"batch": len(inputs[1]), "threads": torch.get_num_threads(), "stats_images": len(stats_images),
            "reps": s.reps, "runs": runs}


def run_generation(args: argparse.Namespace, s: Settings, data: common.Cifar) -> dict:
    """The generation section on the first training images, from ``--checkpoint fast_cnn=PATH`` or a randomly
    initialised whitened fast CNN (the cost of generation does not depend on the weights)."""
    path = checkpoints(args).get("fast_cnn")
    if path:
        model, source = common.load_weights("fast_cnn", path), f"fast CNN loaded from `{path}`"
    else:
        # The images used for whitening / BatchNorm come after the generated ones: no overlap.
        stats_images = data.train_x[s.generation_images : s.generation_images + s.stats_images].float().div(255)
        model = ensemble_speed.members_with_statistics(0, whiten=True, images=stats_images)[0]  # k=0: one model
        source = (f"randomly initialised fast CNN with the mini configs' patch-whitening stem; whitening and "
                  f"BatchNorm statistics from {len(stats_images)} other training images")
    x, y = data.train_x[: s.generation_images], data.train_y[: s.generation_images]
    runs = generation_speed.generation_section(model, x, y, s.generation_batch, s.generation_reps,
                                               s.generation_steps)
    return {"source": source, "batch": s.generation_batch, "reps": s.generation_reps, "runs": runs}


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = settings_from(args)
    started = time.perf_counter()
    results: dict = {"command": command_line(), "quick": args.quick, "settings": asdict(s),
                     "machine": common.machine_info(), "section_seconds": {}}
    if args.update:
        if not args.update.is_file():
            raise SystemExit(f"--update {args.update}: no such file; pass the --json of an earlier full run")
        earlier = json.loads(args.update.read_text())
        results = {**earlier, "updated_by": [*earlier.get("updated_by", []),
                   {"command": command_line(), "sections": args.sections, "settings": asdict(s),
                    "machine": results["machine"]}]}
    print(f"[bench] {results['command']}\n[bench] {torch.get_num_threads()} torch threads", flush=True)

    def timed(section: str, fn, *fn_args):
        start = time.perf_counter()
        out = fn(*fn_args)
        results["section_seconds"][section] = time.perf_counter() - start
        return out

    def save_so_far() -> None:  # a later section's crash must not lose the minutes already measured
        if args.json:
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(results, indent=1, default=str))
            tmp.replace(args.json)

    data = timed("load data", common.Cifar.load, args.data_dir)
    needs_models = {"attacks", "hardware", "profile"} & set(args.sections)
    models, results["models"] = timed("train models", prepare_models, args, s, data) if needs_models else ({}, {})

    if "attacks" in args.sections:
        robustness, results["robustness_status"] = attack_speed.load_robustness(args.robustness_path)
        print(f"[attacks] {results['robustness_status']}", flush=True)
        results["attacks"], specs = timed("attacks", run_attacks, models, s, data, robustness)
        results["attack_specs"] = {spec.key: spec.describe() for spec in specs}
        save_so_far()
    if "training" in args.sections:
        results["training"] = timed("training", train_speed.training_section, args.data_dir,
                                    ["standard", "adversarial_l2"], s.train_batch, s.train_warmup,
                                    s.train_batches, s.reps)
        for name, r in results["training"].items():
            print(f"[training] {name}: Lightning {r['lightning']['images_per_s']:.1f} img/s, plain "
                  f"{r['plain']['images_per_s']:.1f} img/s, overhead {r['overhead']:+.1%}", flush=True)
        save_so_far()
    if "hardware" in args.sections:
        results["hardware"] = timed("hardware", run_hardware, models, s, data)
        save_so_far()
    if "profile" in args.sections:
        results["profile"] = timed("profile", run_profile, models, s, data)
        save_so_far()
    if "ensemble" in args.sections:
        results["ensemble"] = timed("ensemble", run_ensemble, s, data)
        save_so_far()
    if "generation" in args.sections:
        results["generation"] = timed("generation", run_generation, args, s, data)

    results["targets"] = report.evaluate_targets(results)
    this_run = results["updated_by"][-1] if args.update else results  # an update keeps the full run's header
    this_run["total_seconds"] = time.perf_counter() - started
    this_run["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(report.render(results))
    tmp.replace(args.out)
    save_so_far()
    print(f"[bench] wrote {args.out} in {this_run['total_seconds']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()
