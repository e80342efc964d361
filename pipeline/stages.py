"""A stage of the reproduction, its cache key and the commands it runs.

A *train* stage is ``python train.py fit --config BASE --config C [overrides] --run_dir OUT/<stage>`` (BASE: the
scale's shared file, C: the experiment's) followed by one
``python train.py test ... --ckpt_path OUT/<stage>/checkpoints/last.ckpt`` per entry of ``tests`` (each with its
own run directory ``OUT/<stage>/<label>``, so their results stay apart). A *measure* stage is
``python -m pipeline.measure NAME --out OUT/<stage> [args]``. An *imported* train stage (``reproduce --use
STAGE=FILE``) replaces its fit by ``python -m models.imported FILE OUT/<stage>/checkpoints/last.ckpt`` and tests
that model as the stage would test its own. Either can be copied from ``stage.log`` and run
by hand.

Arguments may name other stages' outputs with placeholders, expanded when the command is built:
``{ckpt:NAME}`` -> ``OUT/NAME/checkpoints/last.ckpt``, ``{dir:NAME}`` -> ``OUT/NAME``, ``{out}`` -> ``OUT``.
A stage must list every stage it refers to in ``deps``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "train.py"
MEASURE_MODULE = "pipeline/measure.py"  # the "config" of a measure stage: its code enters the key
MEASURE_MODULE_NAME = "pipeline.measure"
IMPORT_MODULE_NAME = "models.imported"
FIT, IMPORT = "fit", "import"  # the first step of a train stage: train its model, or import one
KEY_FORMAT = 1  # bump when the meaning of a key field changes
PLACEHOLDER = re.compile(r"\{(ckpt|dir):([A-Za-z0-9_]+)\}|\{out\}")


class StageError(UserError, ValueError):
    """A stage or a preset is malformed (missing config, unknown dependency, ...); the message says how to fix it."""


LAST = "last.ckpt"
# The files of a reproduction's folder (OUT/<stage>/... and OUT/...): written by pipeline/runner.py, read by it and
# by pipeline/progress.py. numerics.json is written by lightning_modules/trainer.py into a fit's run directory.
STAGE_JSON, ATTEMPT_JSON, LOG, MEASURE_JSON = "stage.json", "attempt.json", "stage.log", "measure.json"
NUMERICS_JSON, REPRODUCTION_JSON, LOCK = "numerics.json", "reproduction.json", "reproduce.lock"
IMPORTED_JSON = "imported.json"  # an imported stage's record of its model's origin (models/imported.py)


@dataclass(frozen=True)
class Test:
    """One ``train.py test`` run of a train stage: results under ``label``, extra arguments ``args``, the weights
    ``checkpoint`` (a file in the stage's checkpoints/ folder: one fit can save several, e.g. squares' epoch 1)."""

    __test__ = False  # pytest: a pipeline step, not a test class
    label: str
    args: tuple[str, ...] = ()
    checkpoint: str = LAST


TEST = (Test("test"),)
NO_SWEEP = "configs/overlays/no_sweep.yaml"  # overlay: checkpoints only, no accuracy-under-attack evaluation
# D_det-style datasets are also scored against the shifted labels y + 1 (Ilyas Table 1, Nakkiran 4.2); robust
# accuracy against shifted labels means nothing, so that test skips the attack sweep.
TEST_AND_SHIFTED = (Test("test"), Test("test_shift1", ("--data.init_args.test_label_shift", "1", "--config", NO_SWEEP)))


@dataclass(frozen=True)
class Stage:
    """One node of the graph. ``config`` is the experiment's YAML config (train stage), stacked on the ``base``
    configs, or ``MEASURE_MODULE`` (measure stage, with ``measure`` naming the function of ``pipeline.measure``).
    ``imported``: the absolute path of a model file that replaces the train stage's fit (``with_imports``).
    ``inputs``: files from outside the reproduction that the stage reads (an imported model, the authors' released
    datasets); their sha256 enters the key."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    deps: tuple[str, ...] = ()
    tests: tuple[Test, ...] = TEST
    measure: str | None = None
    base: tuple[str, ...] = ()
    imported: str | None = None
    inputs: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "measure" if self.measure else "train"

    def config_files(self) -> list[Path]:
        """The base configs, the config and every ``--config FILE`` among the overrides, in the order they stack,
        resolved against the repository."""
        return [*map(resolve, self.base), resolve(self.config), *config_args(self.overrides)]

    def referenced(self) -> set[str]:
        """Names of the stages the arguments refer to through placeholders."""
        args = [*self.overrides, *(a for t in self.tests for a in t.args)]
        return {m.group(2) for a in args for m in PLACEHOLDER.finditer(a) if m.group(2)}


def train_stage(name: str, config: str, *overrides: str, base: Sequence[str] = (), deps: Sequence[str] = (),
                tests: tuple[Test, ...] = TEST) -> Stage:
    return Stage(name, config, tuple(overrides), tuple(deps), tests, base=tuple(base))


def measure_stage(name: str, function: str, *args: str, deps: Sequence[str] = ()) -> Stage:
    return Stage(name, MEASURE_MODULE, tuple(args), tuple(deps), tests=(), measure=function)


def ckpt_list(*names: str) -> str:
    """A YAML list of the named stages' last checkpoints, for ``--data.init_args.sources``."""
    return "[" + ", ".join(f'"{{ckpt:{n}}}"' for n in names) + "]"


def option_value(args: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` among ``args`` (a later option wins), None if there is none."""
    return args[len(args) - args[::-1].index(flag)] if flag in args else None


def config_args(args: Sequence[str]) -> list[Path]:
    """Every ``--config FILE`` among ``args``, resolved against the repository."""
    return [resolve(b) for a, b in zip(args, args[1:], strict=False) if a == "--config"]


def resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else REPO / path


def check_graph(stages: Sequence[Stage]) -> None:
    """Names are unique, dependencies come earlier in the list, placeholders name dependencies."""
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise StageError(f"stage {stage.name!r} is defined twice")
        if unknown := [d for d in stage.deps if d not in seen]:
            raise StageError(f"stage {stage.name!r} depends on {unknown}, which are not defined before it")
        if undeclared := stage.referenced() - set(stage.deps):
            raise StageError(f"stage {stage.name!r} refers to {sorted(undeclared)} in its arguments; add them to "
                             "its deps so they run first and enter its key")
        seen.add(stage.name)


# ------------------------------------------------------------------------------------------------- the key


def file_sha256(path: Path, stage: str) -> str:
    if not path.is_file():
        raise StageError(f"stage {stage!r}: config {path} does not exist. Write it, or run the other stages with "
                         f"--only (e.g. --only standard)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def auto_precision() -> dict[str, str]:
    """What ``precision: auto`` means on this machine, per device type: a run moved to a machine where it means
    something else is another run (common/numerics.py; imported here only, to keep torch out of the rest)."""
    import torch

    from common.numerics import AUTO, resolve_precision

    types = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    return {t: str(resolve_precision(AUTO, t)[0]) for t in types}


@functools.cache
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def input_sha256(path: str, stage: str) -> str:
    """sha256 of a file from outside the reproduction (cached per file version: keys are computed more than
    once, and released datasets are hundreds of MB)."""
    file = Path(path)
    if not file.is_file():
        raise StageError(f"stage {stage!r} reads {path}, which does not exist (check --use / --released)")
    stat = file.stat()
    return _sha256(str(file), stat.st_mtime_ns, stat.st_size)


def with_imports(stages: Sequence[Stage], uses: Mapping[str, str | Path]) -> list[Stage]:
    """``stages`` with the train stages named in ``uses`` (stage -> model file) taking that model instead of
    training their own; the stages downstream read it as they would read the trained one."""
    by_name = {s.name: s for s in stages}
    for name, file in uses.items():
        if name not in by_name or by_name[name].kind != "train":
            trains = ", ".join(s.name for s in stages if s.kind == "train")
            raise StageError(f"--use {name}=...: the preset has no train stage {name!r}; choose one of {trains}")
        if not Path(file).is_file():
            raise StageError(f"--use {name}={file}: no such file. Pass a robustness-library .pt file or a suite "
                             ".ckpt (see python -m models.imported --help)")
    return [dataclasses.replace(s, imported=(file := str(Path(uses[s.name]).resolve())), inputs=(*s.inputs, file))
            if s.name in uses else s for s in stages]


def stage_key(stage: Stage, *, preset: str, dep_ids: Mapping[str, str], extra_args: Sequence[str] = ()) -> str:
    """sha256 of everything that determines the stage's result: the bytes of its config file(s), its arguments
    (placeholders unexpanded, so the key does not depend on where OUT is), the pass-through trainer arguments,
    the preset, the run ids of its dependencies (a rerun upstream changes them, so keys chain), the bytes of its
    ``inputs`` and, for a train stage, what ``precision: auto`` means on this machine."""
    description = {
        "format": KEY_FORMAT,
        "preset": preset,
        "kind": stage.kind,
        "measure": stage.measure,
        "configs": [file_sha256(f, stage.name) for f in stage.config_files()],
        "overrides": list(stage.overrides),
        "tests": [[t.label, list(t.args), *([t.checkpoint] if t.checkpoint != LAST else [])] for t in stage.tests],
        "extra_args": list(extra_args) if stage.kind == "train" else [],
        "deps": {d: dep_ids[d] for d in stage.deps},
        "auto_precision": auto_precision() if stage.kind == "train" else None,
        **({"inputs": {f: input_sha256(f, stage.name) for f in stage.inputs}} if stage.inputs else {}),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


# -------------------------------------------------------------------------------------------- the commands


def stage_dir(out: Path, name: str) -> Path:
    return out / name


def last_checkpoint(out: Path, name: str, file: str = LAST) -> Path:
    return out / name / "checkpoints" / file


def expand(arg: str, out: Path) -> str:
    """Replace the placeholders of one argument by paths under ``out``."""

    def path(match: re.Match) -> str:
        kind, name = match.group(1), match.group(2)
        if kind == "ckpt":
            return str(last_checkpoint(out, name))
        return str(stage_dir(out, name)) if kind == "dir" else str(out)

    return PLACEHOLDER.sub(path, arg)


def _expanded(args: Sequence[str], out: Path) -> list[str]:
    # Config files are found relative to the repository, wherever the pipeline is started from.
    args = [expand(a, out) for a in args]
    return [str(resolve(b)) if a == "--config" else b for a, b in zip(["", *args], args, strict=False)]


def _configs(stage: Stage) -> list[str]:
    return [a for c in (*stage.base, stage.config) for a in ("--config", str(resolve(c)))]


def fit_command(stage: Stage, out: Path, extra_args: Sequence[str] = (), *, resume: bool = False) -> list[str]:
    cmd = [sys.executable, str(TRAIN_PY), "fit", *_configs(stage),
           *_expanded(stage.overrides, out), *extra_args, "--run_dir", str(stage_dir(out, stage.name))]
    # ckpt_path "last": Lightning resumes from the newest last*.ckpt in the ModelCheckpoint's dirpath.
    return cmd + ["--ckpt_path", "last"] if resume else cmd


def import_command(stage: Stage, out: Path) -> list[str]:
    return [sys.executable, "-m", IMPORT_MODULE_NAME, str(stage.imported), str(last_checkpoint(out, stage.name)),
            "--record", str(stage_dir(out, stage.name) / IMPORTED_JSON)]


def network_args(path: str) -> list[str]:
    """``--model.init_args.*`` arguments that make a test's model the network of the model file ``path`` (an
    imported model need not be the config's, e.g. the authors' ResNet-50 in place of mini's fast CNN)."""
    from models.imported import network_of  # torch: imported here only, for imported stages

    network = network_of(path)
    return [a for key, value in network.items() if value is not None
            for a in (f"--model.init_args.{key}", value if isinstance(value, str) else json.dumps(value))]


def test_command(stage: Stage, test: Test, out: Path, extra_args: Sequence[str] = ()) -> list[str]:
    network = network_args(stage.imported) if stage.imported else []
    return [sys.executable, str(TRAIN_PY), "test", *_configs(stage),
            *_expanded(stage.overrides, out), *network, *extra_args, *_expanded(test.args, out),
            "--run_dir", str(stage_dir(out, stage.name) / test.label),
            "--ckpt_path", str(last_checkpoint(out, stage.name, test.checkpoint))]


def measure_command(stage: Stage, out: Path, extra_args: Sequence[str] = ()) -> list[str]:
    """The measure's own arguments; the ``--config`` files among the pass-through arguments (e.g. a wandb logger
    config) give it the loggers the train stages use."""
    configs = [str(c) for c in config_args(extra_args)]
    return [sys.executable, "-m", MEASURE_MODULE_NAME, stage.measure, "--out", str(stage_dir(out, stage.name)),
            *_expanded(stage.overrides, out), *(["--logger_config", *configs] if configs else [])]


def commands(stage: Stage, out: Path, extra_args: Sequence[str] = (), *, resume: bool = False
             ) -> list[tuple[str, list[str]]]:
    """The (step label, argv) pairs a stage runs, in order: ``fit`` (or ``import``) then its tests, or
    ``measure``."""
    if stage.kind == "measure":
        return [("measure", measure_command(stage, out, extra_args))]
    first = (IMPORT, import_command(stage, out)) if stage.imported else (FIT, fit_command(stage, out, extra_args,
                                                                                          resume=resume))
    return [first,
            *((t.label, test_command(stage, t, out, extra_args)) for t in stage.tests)]


def seed_of(stage: Stage) -> int | None:
    """The seed a train stage runs with: ``--seed_everything`` among its overrides, else its config's."""
    if stage.kind != "train":
        return None
    for flag, value in zip(stage.overrides, stage.overrides[1:], strict=False):
        if flag == "--seed_everything":
            return int(value)
    import yaml

    for path in reversed(stage.config_files()):  # later --config files win
        if path.is_file() and "seed_everything" in (config := yaml.safe_load(path.read_text()) or {}):
            return config["seed_everything"]
    return None
