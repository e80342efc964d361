"""The issue's targets judged on a results dict, and the markdown of BENCHMARKS.md."""

from __future__ import annotations

from bench import ensemble_speed
from bench.attack_speed import OURS, OURS_BF16, OURS_CL, OURS_FP32, ROBUSTNESS, TORCHATTACKS
from bench.common import native_bf16
from bench.generation_speed import ONE as ONE_PROCESS
from bench.generation_speed import TWO as TWO_PROCESSES
from common.numerics import BF16

ARCH_NAMES = {"fast_cnn": "fast CNN (widths 32/64/128)", "resnet18": "CIFAR ResNet-18"}
NORM_NAMES = {"linf": "Linf", "l2": "L2"}
# The speed issue's floors: ours with the numerics `precision: auto` picks vs torchattacks fp32, per network
SPEEDUP_TARGETS, SUCCESS_TOLERANCE = {"fast_cnn": 5.0, "resnet18": 3.0}, 0.02
LIGHTNING_TOLERANCE = 0.10
PEAK_TARGET = 0.70  # the fast CNN's attack step against the bf16 matrix-multiply rate


def default_method(machine: dict) -> str:
    """The attack numerics that ``precision: auto`` resolved to on the machine of the results; results written
    before machine_info recorded it were judged with bf16 as the default, and still are."""
    return OURS_BF16 if machine.get("auto_precision", BF16) == BF16 else OURS_CL


def _fmt_rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# ------------------------------------------------------------------------------------------------- targets


def _fp32_gap_reason(results: dict, ratio: float, ours: dict, theirs: dict) -> str:
    """Why ours fp32 may trail torchattacks: the profile's share of our own arithmetic, against the noise."""
    text = f"ours is {1 - ratio:.0%} slower on the same work."
    prof = results.get("profile", {}).get("runs", {}).get("fp32")
    if prof:
        own = sum(c["ms"] for c in prof["categories"].values() if c["owner"] == "ours")
        text += (f" In the profile, our own arithmetic (step, projection, input checks of attacks/pgd.py) is "
                 f"{own / prof['total_ms']:.1%} of an fp32 step; the rest of a gap larger than that is not spent in "
                 "our own ops.")
    return text + (f" The repetitions' spread was {ours['spread']:.0%} (ours) and {theirs['spread']:.0%} "
                   "(torchattacks); compare it with the gap.")


def _attack_targets(results: dict) -> list[dict]:
    out = []
    isa = results["machine"]["isa"]
    default = default_method(results["machine"])
    for arch, by_norm in results.get("attacks", {}).items():
        target = SPEEDUP_TARGETS.get(arch, max(SPEEDUP_TARGETS.values()))
        for norm, m in by_norm.items():
            where = f"{ARCH_NAMES.get(arch, arch)}, {NORM_NAMES[norm]}"
            ta = m[TORCHATTACKS]
            ours, fp32, cl, bf16 = m[default], m[OURS_FP32], m[OURS_CL], m[OURS_BF16]
            speedup = ours["image_steps_per_s"] / ta["image_steps_per_s"]
            gap = abs(ours["success_rate"] - ta["success_rate"])
            ok = speedup >= target and gap <= SUCCESS_TOLERANCE
            reasons = []
            if speedup < target:
                slow = cl["image_steps_per_s"] / bf16["image_steps_per_s"]
                if slow > 1 and not native_bf16(isa):
                    reasons.append(
                        f"bf16 autocast is {slow:.1f}x SLOWER than fp32 + channels_last here. The CPU has no native "
                        "bf16 arithmetic (no avx512_bf16, no amx_bf16) and PyTorch reports "
                        f"`torch.ops.mkldnn._is_mkldnn_bf16_supported() == "
                        f"{results['machine'].get('mkldnn_bf16_supported')}`, so bf16 convolutions do not go "
                        "through oneDNN but through ATen's fallback (`aten::_slow_conv2d_forward/backward`: im2col "
                        "+ a bf16 GEMM; see the profile below). That is PyTorch on this CPU, not ours. The fastest "
                        f"numerics of ours here are fp32 + channels_last, at "
                        f"{cl['image_steps_per_s'] / ta['image_steps_per_s']:.2f}x torchattacks, which is what the "
                        "mini configs use.")
                else:
                    reasons.append(f"speed-up {speedup:.2f}x < {target:g}x; see section 3 (the step's share of the "
                                   "matrix-multiply rate) and the profile in section 4.")
            if gap > SUCCESS_TOLERANCE:
                reasons.append(f"success rates differ by {gap * 100:.1f} points "
                               f"({ours['success_rate']:.3f} vs {ta['success_rate']:.3f}).")
            out.append({"target": f"{where}: ours with auto's numerics on this machine ({default}) >= "
                                  f"{target:g}x torchattacks fp32, success within "
                                  f"{SUCCESS_TOLERANCE * 100:g} points",
                        "passed": ok,
                        "measured": f"{speedup:.2f}x, success {ours['success_rate']:.3f} vs {ta['success_rate']:.3f}",
                        "reason": " ".join(reasons)})
            ratio = fp32["image_steps_per_s"] / ta["image_steps_per_s"]
            out.append({"target": f"{where}: ours fp32 >= torchattacks fp32 (same model, contiguous)",
                        "passed": ratio >= 1.0,
                        "measured": f"{ratio:.2f}x (with channels_last: "
                                    f"{cl['image_steps_per_s'] / ta['image_steps_per_s']:.2f}x)",
                        "reason": "" if ratio >= 1.0 else _fp32_gap_reason(results, ratio, fp32, ta)})
    return out


def _training_targets(results: dict) -> list[dict]:
    out = []
    for name, r in results.get("training", {}).items():
        ok = r["overhead"] <= LIGHTNING_TOLERANCE
        out.append({"target": f"{name}: Lightning at most {LIGHTNING_TOLERANCE:.0%} slower than the plain loop",
                    "passed": ok, "measured": f"{r['overhead']:+.1%}",
                    "reason": "" if ok else
                    "per step, the Trainer runs its hooks and callbacks, the optimizer closure, and the module's "
                    "self.log calls (loss, torchmetrics accuracy on_step and on_epoch"
                    + (", and every 10 steps an extra clean forward for train/clean_acc" if "adv" in name else "")
                    + "), which the plain loop does not; the spread of the repetitions was "
                    f"{max(r['lightning']['spread'], r['plain']['spread']):.0%}."})
    return out


def _efficiency_targets(results: dict) -> list[dict]:
    hw, attacks = results.get("hardware"), results.get("attacks", {})
    if not hw or "fast_cnn" not in attacks or "fast_cnn" not in hw["flops"]:
        return []
    out = []
    flops = hw["flops"]["fast_cnn"]["step"]
    bf16_mm, fp32_mm = hw["matmul"]["bf16"]["gflops"], hw["matmul"]["fp32"]["gflops"]
    for norm, m in attacks["fast_cnn"].items():
        for method, mm, mm_name, supplementary in ((OURS_BF16, bf16_mm, "bf16", False),
                                                   (OURS_CL, fp32_mm, "fp32", True)):
            achieved = flops * m[method]["image_steps_per_s"] / 1e9
            share = achieved / mm
            ok = share >= PEAK_TARGET
            label = (f"fast CNN, {NORM_NAMES[norm]}: attack step ({method}) at >= {PEAK_TARGET:.0%} of the "
                     f"measured {mm_name} matrix-multiply rate")
            note = ""
            if not supplementary and bf16_mm < fp32_mm / 4:
                note = (f"the bf16 matmul itself runs at {bf16_mm:.1f} GFLOP/s here, {fp32_mm / bf16_mm:.0f}x below "
                        "fp32 (no oneDNN bf16 on this CPU), so this bar says little; the fp32 line below is the "
                        "meaningful one.")
            out.append({"target": label + (" (supplementary: the same bar for our fastest fp32 numerics)"
                                           if supplementary else ""),
                        "passed": ok, "measured": f"{achieved:.1f} / {mm:.1f} GFLOP/s = {share:.0%}", "note": note,
                        "reason": "" if ok else
                        "the fast CNN's convolutions are small (3-128 channels, 32x32 down to 4x4 maps) and run far "
                        "from a large square matmul's rate; batch norm, GELU, pooling, the layout/dtype copies and "
                        "the attack arithmetic take time but count no FLOPs (see the profile categories)."})
    return out


def evaluate_targets(results: dict) -> list[dict]:
    """Every target of the issue that this run measured, each ``{target, passed, measured, reason}``."""
    return _attack_targets(results) + _training_targets(results) + _efficiency_targets(results)


# ------------------------------------------------------------------------------------------------ sections


def _header(r: dict) -> list[str]:
    mc = r["machine"]
    isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in mc["isa"].items())
    lines = ["# Benchmarks", ""]
    if r["quick"]:
        lines += ["> **QUICK SMOKE RUN** (`--quick`): tiny batches, 2 attack steps, 1 repetition. The numbers "
                  "below check that the script works; they are not benchmarks.", ""]
    lines += [
        "Produced by:", "", "```bash", r["command"], "```", "",
        f"in {r['total_seconds'] / 60:.1f} min ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in r["section_seconds"].items()) + ").",
        "Every figure is the median over "
        f"{r['settings']['reps']} repetition(s) after a warm-up (column n: an attack figure whose repetitions "
        f"would take over {r['settings']['max_figure_seconds']:.0f} s gets fewer, at least 3); every ratio "
        "compares figures of this one run. Methods are interleaved (A B C A B C ...) so a drift of the machine's "
        "speed is shared; spread = (max - min) / median of the repetitions.", "",
        "## Machine", "",
        *_table(["", ""], [
            ["CPU", mc["cpu"]],
            ["logical CPUs (usable)", f"{mc['logical_cpus']} ({mc['cpus_usable']})"],
            ["ISA flags", isa],
            ["torch CPU capability", str(mc["torch_cpu_capability"])],
            ["oneDNN bf16 supported (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`)",
             str(mc.get("mkldnn_bf16_supported"))],
            ["torch / Lightning / torchattacks", f"{mc['torch']} / {mc['pytorch_lightning']} / {mc['torchattacks']}"],
            ["torch.get_num_threads()", f"{mc['torch_threads']} (OMP_NUM_THREADS={mc['OMP_NUM_THREADS']})"],
            ["Python", mc["python"]],
            ["date", mc["date"]],
            ["load average at start / end",
             f"{_load(mc.get('load_average_at_start'))} / {_load(mc.get('load_average_at_end'))}"],
        ]), ""]
    for update in r.get("updated_by", []):
        lines += [f"Then updated (sections {', '.join(update['sections'])} rerun, the rest kept) by:", "", "```bash",
                  update["command"], "```", "",
                  f"on {update['machine']['date']} in {update.get('total_seconds', 0) / 60:.1f} min, load average at "
                  f"start / end {_load(update['machine'].get('load_average_at_start'))} / "
                  f"{_load(update['machine'].get('load_average_at_end'))}.", ""]
    return lines


def _load(v) -> str:
    return "n/a" if not v else ", ".join(f"{x:.2f}" for x in v)


def _models(r: dict) -> list[str]:
    if not r.get("models"):
        return []
    rows = [[ARCH_NAMES.get(a, a), m["source"], f"{m['clean_accuracy']:.3f} ({m['eval_images']} test images)",
             f"{m['seconds']:.0f} s"] for a, m in r["models"].items()]
    return ["### The attacked models", "",
            *_table(["model", "weights", "clean accuracy", "time"], rows), ""]


def _attacks(r: dict) -> list[str]:
    if "attacks" not in r:
        return []
    st = r["settings"]
    lines = ["## 1. Attack throughput and success", "",
             "Same model, same batch of real CIFAR-10 test images (test set positions 1000 onwards), same budget, "
             "no random start; every method returns its last iterate (ours and robustness with `use_best=False`), "
             "so each does exactly `steps` forward + backward passes per image. Throughput is image-steps per "
             "second (images x steps / seconds). Success: the fraction of the clean-correct images that the "
             "fp32 model misclassifies after the attack. max |delta| confirms every method stayed in its budget.",
             "", *[f"- {v}" for v in r["attack_specs"].values()],
             f"- robustness library: {r['robustness_status'].rstrip('.')}.", "", *_models(r)]
    for arch, by_norm in r["attacks"].items():
        batch = st["attack_batch"][arch]
        lines += [f"### {ARCH_NAMES.get(arch, arch)}, batch of {batch} images", ""]
        rows = []
        for norm, by_method in by_norm.items():
            base = by_method[TORCHATTACKS]["image_steps_per_s"]
            for method, m in by_method.items():
                name = method
                if method == TORCHATTACKS:
                    cls = "PGD" if norm == "linf" else "PGDL2"
                    name = f"torchattacks {cls} (defaults but random_start=False, fp32)"
                budget = m["max_linf"] * 255 if norm == "linf" else m["max_l2"]
                rows.append([NORM_NAMES[norm], name, _fmt_rate(m["image_steps_per_s"]), f"{m['reps']}",
                             f"{m['spread']:.0%}",
                             f"{m['image_steps_per_s'] / base:.2f}x", f"{m['success_rate']:.3f}",
                             f"{m['clean_correct']}", f"{budget:.3f}" + ("/255" if norm == "linf" else "")])
        lines += _table(["norm", "method", "image-steps/s", "n", "spread", "vs torchattacks", "success rate",
                         "clean-correct", "max \\|delta\\|"], rows) + [""]
    return lines


def _training(r: dict) -> list[str]:
    if "training" not in r:
        return []
    rows = []
    for name, t in r["training"].items():
        rows.append([f"{name} (`{t['config']}`)", f"{t['batch_size']}",
                     f"{_fmt_rate(t['lightning']['images_per_s'])} ({t['lightning']['spread']:.0%})",
                     f"{_fmt_rate(t['plain']['images_per_s'])} ({t['plain']['spread']:.0%})",
                     f"{t['overhead']:+.1%}",
                     f"{t['lightning']['fit_seconds']:.1f} s / {t['plain']['fit_seconds']:.1f} s"])
    any_t = next(iter(r["training"].values()))
    return ["## 2. Training throughput: Lightning vs a plain PyTorch loop", "",
            "ClassifierModule / AdversarialModule with the hyperparameters of the mini config, under `pl.Trainer` "
            "(fp32 `32-true`, logger=False, no checkpointing, no progress bar, no model summary, no validation, "
            "`limit_train_batches`), against a plain loop with the same model (fast CNN, channels_last), the same "
            "uint8 in-memory CIFAR-10 tensors cut into the same batches, the same on-device crop/flip "
            "(datamodules/augment.py), the same SGD + Nesterov and per-step linear schedule, the same label "
            "smoothing. Adversarial: our PGD inside AdversarialModule (L2 eps 0.5, 2 steps of 0.3, no random "
            "start, last iterate) against torchattacks PGDL2 with the same eps/steps/step size in the plain loop. "
            f"Images/s over {any_t['timed_batches']} batches after {any_t['warmup_batches']} warm-up batches "
            "(end of the last warm-up batch to the end of the last batch); the fit's total time, start-up "
            "included, is in the last column. The plain loop does not compute training accuracy; the modules do "
            "(torchmetrics), and AdversarialModule also runs one clean forward every 10 steps.", "",
            *_table(["run", "batch", "Lightning img/s (spread)", "plain img/s (spread)", "Lightning slower by",
                     "whole fit, Lightning / plain"], rows), ""]


def _hardware(r: dict) -> list[str]:
    hw = r.get("hardware")
    if not hw:
        return []
    mm = hw["matmul"]
    lines = ["## 3. Efficiency against the hardware", "",
             "Matrix-multiply rate, `torch.mm` of two n x n matrices (n doubled up to the largest size that "
             f"keeps one product short), median of {len(mm['fp32']['seconds'])}: "
             f"**fp32 {mm['fp32']['gflops']:.1f} GFLOP/s** (n={mm['fp32']['n']}, spread {mm['fp32']['spread']:.0%}), "
             f"**bf16 {mm['bf16']['gflops']:.1f} GFLOP/s** (n={mm['bf16']['n']}, spread {mm['bf16']['spread']:.0%}).",
             "",
             "FLOPs per image-step: one forward and one backward with respect to the input only (what `pgd` "
             "computes; no weight gradients), counted by `torch.utils.flop_counter.FlopCounterMode` "
             "(convolutions and matmuls; element-wise layers count zero).", ""]
    lines += _table(["model", "MFLOP per image-step", "MFLOP per forward"],
                    [[ARCH_NAMES.get(a, a), f"{f['step'] / 1e6:.1f}", f"{f['forward'] / 1e6:.1f}"]
                     for a, f in hw["flops"].items()]) + [""]
    rows = []
    for arch, by_norm in r.get("attacks", {}).items():
        if arch not in hw["flops"]:
            continue
        for norm, by_method in by_norm.items():
            for method in (*OURS, TORCHATTACKS, ROBUSTNESS):
                if method not in by_method:
                    continue
                achieved = hw["flops"][arch]["step"] * by_method[method]["image_steps_per_s"] / 1e9
                rows.append([ARCH_NAMES.get(arch, arch), NORM_NAMES[norm], method, f"{achieved:.1f}",
                             f"{achieved / mm['fp32']['gflops']:.0%}", f"{achieved / mm['bf16']['gflops']:.0%}"])
    if rows:
        lines += ["Achieved rate = FLOPs per image-step x measured image-steps/s (section 1).", "",
                  *_table(["model", "norm", "method", "achieved GFLOP/s", "% of fp32 mm", "% of bf16 mm"], rows),
                  ""]
    return lines


def _targets(r: dict) -> list[str]:
    lines = ["## 4. Targets of the issue", ""]
    if not r["targets"]:
        return lines + ["No target was measured in this run (sections skipped).", ""]
    for t in r["targets"]:
        lines.append(f"- **{'PASS' if t['passed'] else 'MISS'}** {t['target']}: {t['measured']}."
                     + (f" *Why:* {t['reason']}" if t["reason"] else "")
                     + (f" *Note:* {t['note']}" if t.get("note") else ""))
    return lines + ["", *_profile(r)]


def _profile(r: dict) -> list[str]:
    p = r.get("profile")
    if not p:
        return []
    runs = p["runs"]
    lines = [f"### Profile of one attack step ({ARCH_NAMES.get(p['arch'], p['arch'])}, batch {p['batch']}, "
             f"{p['spec']}, channels_last, `pgd(steps=1)`)", "",
             f"torch.profiler, CPU: one step of our `pgd` takes **{runs['fp32']['total_ms']:.1f} ms** self CPU in "
             f"fp32 and **{runs['bf16']['total_ms']:.1f} ms** under bf16 autocast "
             f"({runs['bf16']['total_ms'] / runs['fp32']['total_ms']:.1f}x). The convolutions run in "
             f"{_kernels(runs['fp32'])} in fp32 and in {_kernels(runs['bf16'])} in bf16. By category (op names "
             "matched, first match wins; self CPU time):", ""]
    labels = list(dict.fromkeys([*runs["fp32"]["categories"], *runs["bf16"]["categories"]]))
    rows = []
    for label in labels:
        f32 = runs["fp32"]["categories"].get(label, {"ms": 0.0, "owner": ""})
        b16 = runs["bf16"]["categories"].get(label, {"ms": 0.0, "owner": f32["owner"]})
        rows.append([label, f32["owner"] or b16["owner"], f"{f32['ms']:.1f}", f"{b16['ms']:.1f}"])
    lines += _table(["category", "whose", "fp32 ms", "bf16 ms"], rows) + [""]
    for name in ("bf16", "fp32"):
        lines += [f"Top ops, {name} step (key_averages, sorted by self CPU time):", "", "```",
                  runs[name]["table"].rstrip(), "```", ""]
    return lines


def _kernels(run: dict) -> str:
    return " / ".join(f"`{k}`" for k in run.get("top_conv_kernels", [])) or "(none found)"


def _ensemble(r: dict) -> list[str]:
    e = r.get("ensemble")
    if not e:
        return []
    return ["## 5. Nakkiran's ensemble loss: batched (vmap) vs a loop over the models", "",
            "One step of Nakkiran's non-transferable attack: the per-example loss `CE(f(x), t) + mean_i CE(f_i(x), y)` "
            "(`attacks.ensemble.nakkiran_loss`) and its gradient with respect to the input, for a target f and k "
            "ensemble members f_i, the members evaluated by `BatchedEnsemble` (`torch.func`: stack_module_state + "
            "functional_call + vmap, one pass) or by `LoopEnsemble` (a Python loop), on the same batch of "
            f"{e['batch']} real CIFAR-10 test images (positions 1000 onwards), t = (y + 1) mod 10. The models are "
            "randomly initialised fast CNNs with the mini configs' patch-whitening stem (whitening and BatchNorm "
            f"statistics from {e['stats_images']} training images; the cost of a step does not depend on the "
            f"weights), fp32, channels_last inputs, {e['threads']} thread(s). Image-steps/s = batch / median seconds "
            f"per step over {e['reps']} interleaved repetition(s) (`bench/ensemble_speed.py`). The last two columns "
            "compare the two methods' per-example loss and input gradient on the same inputs.", "",
            *ensemble_speed.table(e["runs"]), ""]


def _recipe(description: dict) -> str:
    config = ", ".join(f"{k} {v}" for k, v in description.items() if k != "name")
    return f"`{description['name']}` ({config})"


def _generation(r: dict) -> list[str]:
    g = r.get("generation")
    if not g:
        return []
    rows, any_run = [], next(iter(g["runs"].values()))
    for dataset, m in g["runs"].items():
        one, two = m[ONE_PROCESS], m[TWO_PROCESSES]
        same = "yes" if m["identical"] and m["labels_identical"] else "no"
        split = {True: "yes", False: "**no**", None: "not measured"}[m.get("identical_same_threads")]
        rows.append([dataset, _recipe(m["recipe"]), f"{m['image_steps']:,}",
                     f"{_fmt_rate(one['image_steps_per_s'])} ({one['spread']:.0%})",
                     f"{_fmt_rate(two['image_steps_per_s'])} ({two['spread']:.0%})", f"{m['ratio']:.2f}x",
                     split, f"{same} ({m['max_abs_difference']:.1e})"])
    return ["## 6. Dataset generation throughput: 1 process vs 2 processes", "",
            "Through the suite's engine: `generate_shard` of `datamodules/constructed/engine.py` (per-example "
            "generators seeded from (seed, index), the recipe, the NaN guard, the copies to the CPU) with the "
            "recipes of `datamodules/constructed/recipes.py`, on the first "
            f"{any_run['images']} real CIFAR-10 training images, {any_run['recipe']['steps']} steps per image for both "
            "recipes (the mini configs: 10 for D_rand / D_det, 20 for D_NR, 100 for D_R; the cost per image-step "
            f"changes little with it: two extra forwards per image), generation batch {g['batch']} and shards of "
            f"{g['batch']} images, seed 0, fp32 + channels_last (`generation_precision: 32-true`, "
            f"`generation_channels_last: true`, as the mini configs). Source model: {g['source']}. "
            f"**1 process**: every shard in this process, {any_run[ONE_PROCESS]['threads']} torch thread(s). "
            "**2 processes**: two processes started with torch.multiprocessing's `spawn` context, "
            "`torch.set_num_threads(1)` each, rank r generating shards r, r + 2, ... (the engine's split over 2 DDP "
            "ranks), timed from a barrier, once both have warmed up on one batch, to the barrier both reach when "
            f"done. Median over {g['reps']} interleaved repetition(s) after a one-batch warm-up; image-steps = "
            "images x recipe steps (the engine's count). Identical: `torch.equal` of the images, and of the labels, "
            "generated by the 2 processes and by 1 process on 1 thread (the same kernels: this checks the split "
            "over ranks), and by 1 process on its own thread count (in parentheses the max abs. image difference: "
            "a different number of threads sums in a different order, so the last bits may differ, and the 10 to "
            "100 unconstrained steps of representation inversion amplify them). When other jobs share the "
            "cores, a process with several OpenMP threads slows down far more than single-thread ones (its threads "
            "wait for each other at every parallel region), so the ratio describes an idle machine only if the load "
            "averages in the header are near 0.", "",
            *_table(["dataset", "recipe", "image-steps", "1 process image-steps/s (spread)",
                     "2 processes image-steps/s (spread)", "2 proc / 1 proc", "identical to 1 process, 1 thread",
                     f"identical to 1 process, {any_run[ONE_PROCESS]['threads']} threads"], rows), ""]


def render(results: dict) -> str:
    lines = (_header(results) + _attacks(results) + _training(results) + _hardware(results) + _targets(results)
             + _ensemble(results) + _generation(results))
    return "\n".join(lines).rstrip() + "\n"
