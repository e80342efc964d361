"""``python train.py reproduce``: run a preset's stage graph, then write the report.

    python train.py reproduce --preset mini                      # everything; a rerun skips finished stages
    python train.py reproduce --preset mini --dry-run            # what would run, and why
    python train.py reproduce --status --out runs/reproduce/mini  # what a run has done, is doing, has left
    python train.py reproduce --preset mini --only transfer      # one stage and what it needs
    python train.py reproduce --preset mini --force standard     # rerun standard and everything downstream
    python train.py reproduce --preset paper --use standard=cifar_nat.pt adversarial_l2=cifar_l2_0_5.pt
                                                                 # the authors' models instead of training ours
    python train.py reproduce --preset mini --released ~/release_datasets   # + the authors' D_R, D_NR, D_rand, D_det
    python train.py reproduce --preset paper --trainer.accelerator gpu --trainer.devices 8 --trainer.strategy ddp
    python train.py reproduce --preset paper --rehearse          # the paper graph at CPU sizes, end to end
    python train.py reproduce --preset paper --jobs 8 --trainer.accelerator gpu   # 8 stages at once, a GPU each
    python train.py reproduce --preset paper --launcher slurm --trainer.accelerator gpu   # inside sbatch/salloc
    python train.py reproduce --preset paper --launcher torchrun --nodes 2 --devices-per-node 8 --node-rank R \
        --rdzv-endpoint HOST0:29500 --rdzv-id JOB --trainer.accelerator gpu     # on each node, same --out
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.errors import UserError
from common.files import check_creatable_dir
from pipeline.launch import LAUNCHERS, follow, from_environment
from pipeline.presets import PRESETS, preset, with_released
from pipeline.runner import Runner, exit_on_sigterm, run_subprocess
from pipeline.stages import Stage, commands, with_imports


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python train.py reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="the stage graph (pipeline/presets.py)")
    p.add_argument("--status", action="store_true",
                   help="print what the reproduction in --out has done, is doing and has left, from its files "
                        "(from another terminal, or after the run); runs nothing")
    p.add_argument("--out", default=None, help="output folder (default: runs/reproduce/<preset>)")
    p.add_argument("--force", nargs="+", default=[], action="extend", metavar="STAGE",
                   help="rerun these stages from scratch, and everything downstream")
    p.add_argument("--only", nargs="+", default=[], action="extend", metavar="STAGE",
                   help="run only these stages and the stages they need")
    p.add_argument("--use", nargs="+", default=[], action="extend", metavar="STAGE=FILE",
                   help="take this model instead of training the stage's own: a robustness-library checkpoint "
                        "(cifar_nat.pt, cifar_l2_0_5.pt, ...) or a suite .ckpt; read without running code in it, "
                        "tested like the stage's own, named with its sha256 in the report")
    p.add_argument("--released", default=None, metavar="DIR",
                   help="also train on the authors' released datasets found in DIR (d_robust_CIFAR, "
                        "d_non_robust_CIFAR, drand_CIFAR, ddet_CIFAR), each exactly as the stage that constructs it "
                        "here trains (stages released_<stage>), reported beside the suite's own")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    p.add_argument("--stage-args", default="", metavar="ARGS",
                   help="extra arguments for every train.py command, e.g. \"--trainer.devices 8\"")
    p.add_argument("--rehearse", action="store_true",
                   help="run the paper preset end to end at reduced sizes (same networks, losses, threat models, "
                        "optimisers, precision; fewer epochs, images and steps) to prove it before a GPU run")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run up to N independent stages at once, each on its own slice of the machine (a disjoint "
                        "set of GPUs on a GPU host, a share of the CPU threads otherwise); default 1")
    launch = p.add_argument_group("launcher (pipeline/launch.py)")
    launch.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="how train stages start: local (default; Lightning starts the processes of "
                             "--trainer.devices itself), slurm (srun across the allocation reproduce runs in), "
                             "torchrun (one agent per node)")
    launch.add_argument("--nodes", type=int, default=None,
                        help="nodes of each train stage (slurm: default the allocation's SLURM_JOB_NUM_NODES)")
    launch.add_argument("--devices-per-node", type=int, default=None, metavar="D",
                        help="processes (GPUs) per node (slurm: default the allocation's --ntasks-per-node)")
    launch.add_argument("--node-rank", type=int, default=0, metavar="R",
                        help="torchrun: this node's rank; 0 leads and writes every record, the others follow it")
    launch.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                        help="torchrun across nodes: node 0's address and a free port, reachable from every node")
    launch.add_argument("--rdzv-id", default=None, metavar="ID",
                        help="torchrun across nodes: the same id on every node (e.g. the job id)")
    p.add_argument("--rate-tflops", type=float, default=None, metavar="R",
                   help="--dry-run: the device rate the time estimate assumes, in TFLOP/s (default: this machine's "
                        "fp32 matrix-multiply rate, measured)")
    p.add_argument("--no-report", action="store_true", help="do not write results.md / results.json / figures")
    return p


def print_cost(runner: Runner, extra: Sequence[str], rate_tflops: float | None) -> None:
    """Per stage, the FLOPs it will take and the time they imply at a stated rate (pipeline/cost.py)."""
    from pipeline import cost

    rate = rate_tflops * 1e12 if rate_tflops else cost.matmul_rate()
    source = "stated with --rate-tflops" if rate_tflops else "this machine's fp32 matmul rate, measured now"
    flops = cost.reproduction_flops(runner.selected, runner.out, extra)
    print(f"\ncompute (a floor: {cost.PASSES_PER_STEP} forward passes per training or attack step, loading and "
          f"start-up left out) at {rate / 1e12:.2f} TFLOP/s ({source}):")
    for name, parts in flops.items():
        detail = ", ".join(f"{k} {cost.human(v)}" for k, v in parts.items() if v)
        print(f"  {name:<20} {cost.human(sum(parts.values())):>12}  {cost.duration(sum(parts.values()) / rate):>9}"
              f"  ({detail})")
    total = sum(sum(parts.values()) for parts in flops.values())
    print(f"  {'all':<20} {cost.human(total):>12}  {cost.duration(total / rate):>9}")


def print_status(args: argparse.Namespace) -> dict:
    """``--status``: the picture of the reproduction in ``--out`` (its preset from its reproduction.json)."""
    from common.files import read_json
    from pipeline.progress import status

    if not args.out:
        parser().error("--status needs --out DIR, the folder of the reproduction")
    info = read_json(Path(args.out) / "reproduction.json")
    if info is None:
        print(f"reproduce: {args.out} holds no reproduction (no reproduction.json): start one with "
              f"`python train.py reproduce --preset NAME --out {args.out}`", file=sys.stderr)
        raise SystemExit(1)
    name = info["preset"]
    base, rehearse = name.removesuffix("-rehearsal"), name.endswith("-rehearsal")
    sources = info.get("sources") or {}
    stages = graph(base, rehearse, sources.get("use") or {}, sources.get("released"))
    records = [read_json(Path(args.out) / s.name / "stage.json") or {} for s in stages]
    extra = next((r["extra_args"] for r in records if r.get("extra_args") is not None), [])
    print(f"reproduction {info['id']} (preset {name}) in {args.out}:")
    print(status(Path(args.out), stages, extra, jobs=info.get("jobs", 1)))
    return {}


def graph(name: str, rehearse: bool, uses: Mapping[str, str], released: str | None) -> list[Stage]:
    """The preset's stages with the models of ``--use`` and the datasets of ``--released`` in them."""
    stages = with_imports(preset(name, rehearse=rehearse), uses)
    return with_released(stages, released) if released else stages


def parse_uses(uses: Sequence[str]) -> dict[str, str]:
    """``["standard=FILE", ...]`` as ``{"standard": "FILE"}``; a malformed entry is a usage error."""
    pairs = {}
    for use in uses:
        stage, sep, file = use.partition("=")
        if not sep or not stage or not file:
            parser().error(f"--use {use}: write STAGE=FILE, e.g. --use standard=cifar_nat.pt")
        if stage in pairs:
            parser().error(f"--use names stage {stage!r} twice")
        pairs[stage] = file
    return pairs


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the reproduction; the stage records. ``--trainer.*`` arguments pass through to every train.py run."""
    args, unknown = parser().parse_known_args(argv)
    if args.status:
        return print_status(args)
    if args.preset is None:
        parser().error("--preset is required (or --status --out DIR)")
    if stray := [a for a in unknown if a.startswith("-") and not a.startswith("--trainer.")]:
        parser().error(f"unrecognised arguments {' '.join(stray)} (only --trainer.* pass through to the stages; "
                       "use --stage-args for anything else)")
    name = f"{args.preset}-rehearsal" if args.rehearse else args.preset  # keys, report and folder say it
    out = args.out or f"runs/reproduce/{name}"
    try:
        launch = from_environment(args.launcher, args.nodes, args.devices_per_node, args.node_rank,
                                  args.rdzv_endpoint, args.rdzv_id)
        if not launch.leader:  # another node of a torchrun reproduction: join the leader's launches
            print(f"node {launch.node_rank}: following the launches of node 0 in {out}")
            if not follow(Path(out), launch.rdzv_id, launch.node_rank, run_subprocess):
                raise SystemExit(1)
            return {}
        extra = [*launch.trainer_args(), *unknown, *shlex.split(args.stage_args)]  # the user's come last: they win
        check_creatable_dir(out, "--out")
        uses = parse_uses(args.use)
        stages = graph(args.preset, args.rehearse, uses, args.released)
        sources = {"use": {k: str(Path(v).resolve()) for k, v in uses.items()},
                   "released": str(Path(args.released).resolve()) if args.released else None}
        runner = Runner(stages, out, preset=name, extra_args=extra, force=args.force, only=args.only,
                        jobs=args.jobs, launch=launch, watch=True, sources=sources)
        t0 = time.monotonic()
        checked = runner.check_commands()  # a typo stops here, before anything is run or written
        print(f"checked {checked} commands of {len(runner.selected)} stages in {time.monotonic() - t0:.0f} s: "
              "they parse")
        if args.dry_run:
            for decision in runner.plan():
                print(f"{decision.stage.name:<20} {decision.action:<7} {decision.reason}")
                if decision.action in ("run", "resume"):
                    for label, cmd in commands(decision.stage, runner.out, extra, resume=decision.action == "resume"):
                        print(f"    {label}: {shlex.join(cmd)}")
            print_cost(runner, extra, args.rate_tflops)
            return {}
        with exit_on_sigterm():
            try:
                records = runner.run()
            finally:  # also after a failure or a stop: the report shows what finished, the rest as "not run"
                if not args.no_report:
                    from pipeline.report import write_report

                    written = write_report(out, stages, name, rehearsal=args.rehearse)
                    print(f"report: {written['results.md']}")
    except UserError as err:  # PipelineError, StageError, ConfigError: the message says it all
        print(f"reproduce: {err}", file=sys.stderr)
        raise SystemExit(1) from err
    return records
