"""The suite's LightningCLI: ``--run_dir``, safe checkpoint loading, and errors a person can read.

- ``--run_dir DIR`` sends everything a run writes (logs, config, checkpoints) to DIR; without it, a run of
  ``--config configs/<scale>/base.yaml --config configs/<scale>/<experiment>.yaml`` writes to
  ``runs/<scale>/<experiment>`` (:func:`default_run_dir`), so configs hold no run paths.
- Every ``--ckpt_path`` (local file or URL) is loaded with ``weights_only=True`` and checked before Lightning
  uses it (:mod:`models.checkpoints`); ``--weights_only false`` is refused.
- A mistake of the user (:class:`common.errors.UserError`, a bad option, a YAML syntax error) prints its cause and
  fix in a few lines, without a traceback, and exits with code 2; ``BOF_TRACEBACK=1`` shows the traceback.
  Option typos get a "did you mean".
- :func:`check_command` parses a command with the CLI's own parser and builds nothing (``reproduce`` checks
  every stage's command with it before running the first).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException

from common.errors import SIGTERM_EXIT_CODE, USER_ERROR_EXIT_CODE, ConfigError, show_tracebacks, user_error_in
from common.files import check_creatable_dir
from lightning_modules.trainer import Trainer
from models.checkpoints import LIGHTNING_SPECIAL_PATHS, check_class_path, check_network, read_checkpoint

# Attacks run inside validate/test, and torch.inference_mode cannot be undone by enable_grad (spec 7).
TRAINER_DEFAULTS = {"inference_mode": False}
SUBCOMMANDS = ("fit", "validate", "test", "predict")
BASE_CONFIG = "base.yaml"  # what a scale's experiments share (configs/<scale>/base.yaml)


class ParsedOnly(Exception):
    """Raised by a parse-only CLI once the command has parsed: nothing is instantiated."""


def redirect_outputs(trainer: Any, run_dir: str) -> None:
    """Point the trainer config (a jsonargparse Namespace) at ``run_dir``: default_root_dir, every logger's
    save_dir (wandb: save_dir and dir), every ModelCheckpoint's dirpath (``run_dir/checkpoints``) and every other
    callback's ``output_dir`` (e.g. SquaresRobustness)."""
    trainer.default_root_dir = run_dir
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for logger in loggers:
        args = getattr(logger, "init_args", None)  # True / False / None: Lightning's default uses default_root_dir
        if args is None:
            continue
        if "save_dir" in args:
            args.save_dir = run_dir
        if "wandb" in logger.class_path.lower() and "dir" in args:
            args.dir = run_dir
    callbacks = trainer.callbacks if isinstance(trainer.callbacks, list) else [trainer.callbacks]
    for callback in callbacks:
        args = getattr(callback, "init_args", None)
        if args is None:
            continue
        if callback.class_path.split(".")[-1] == "ModelCheckpoint":
            args.dirpath = f"{run_dir}/checkpoints"
        elif "output_dir" in args:
            args.output_dir = run_dir


def default_run_dir(configs: Sequence[str]) -> str | None:
    """``runs/<scale>/<experiment>`` for the last of ``configs`` that is an experiment of a scale (a file beside a
    ``base.yaml``, other than the base itself); else ``runs/<name>`` of the last config; None without configs.
    Overlays from other folders (``configs/overlays``, ``configs/loggers``, ``configs/ci``) do not rename a run."""
    paths = [Path(c) for c in configs]
    for path in reversed(paths):
        if path.name != BASE_CONFIG and (path.parent / BASE_CONFIG).is_file():
            return str(Path("runs") / path.parent.name / path.stem)
    return str(Path("runs") / paths[-1].stem) if paths else None


# ---------------------------------------------------------------------------------------- readable errors


def config_files(argv: Sequence[str]) -> list[str]:
    """The files of every ``--config FILE`` / ``-c FILE`` / ``--config=FILE`` in ``argv``."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_files(argv: Sequence[str]) -> None:
    """Every ``--config`` file exists and is valid YAML; else one error naming the file, line and column
    (jsonargparse names the YAML ``"<unicode string>"``)."""
    for name in config_files(argv):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"config file {name} not found (resolved: {path.resolve()}). Check the --config path "
                              "(configs/ holds the suite's experiments)")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{name}, line {mark.line + 1}, column {mark.column + 1}" if mark else name
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file {where}: invalid YAML: {problem}. Fix the file (indentation, a "
                              "missing ':' or closing bracket)") from err


def _accepted_init_args(class_path: str) -> list[str]:
    """The init argument names of ``class_path`` (following ``**kwargs`` into the base classes)."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def _option_names(parser: Any) -> list[str]:
    """Every long option of ``parser`` and of its subcommand parsers, without the leading dashes."""
    names, parsers = [], [parser]
    while parsers:
        current = parsers.pop()
        names += [o.lstrip("-") for o in getattr(current, "_option_string_actions", {}) if o.startswith("--")]
        subcommands = getattr(current, "_subcommands_action", None)
        if subcommands is not None:
            parsers += list(subcommands.choices.values())
    return names


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """`` Did you mean 'X'?`` for the closest candidate, or an empty string."""
    tail = word.rsplit(".", 1)
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)
    if not matches and len(tail) == 2:  # compare the last component among options of the same group
        group = [c for c in candidates if c.startswith(tail[0] + ".")]
        matches = [tail[0] + "." + m for m in
                   difflib.get_close_matches(tail[1], [c[len(tail[0]) + 1:] for c in group], n=1, cutoff=0.7)]
    return f" Did you mean {matches[0]!r}?" if matches else ""


def readable_parse_error(message: str, parser: Any) -> str:
    """jsonargparse's error, cut to its cause (the Union-subtype wrapper and the echo of the whole value go),
    with a "did you mean" for an unknown option."""
    key = re.match(r'Parser key "([^"]+)":', message)
    if "Does not validate against any of the Union subtypes" in message:
        errors = message.split("Errors:", 1)[-1].split("Given value type:", 1)[0]
        items = [" ".join(item.split()) for item in re.split(r"\n\s*- ", "\n" + errors) if item.strip()]
        items = [i for i in items if not i.startswith("Expected a <class 'NoneType'>")]
        message = f"{key.group(1)}: " + "; ".join(items) if key else "; ".join(items)
    message = re.sub(r"Problem with given class_path '([\w.]+)':\s*", r"\1: ", message).strip()
    hints = []
    for class_path, option in re.findall(r"([\w.]+): (?:Key|Option) '([\w.]+)' is not accepted", message):
        hints.append(did_you_mean(option, _accepted_init_args(class_path)))
    options = _option_names(parser)
    for option in re.findall(r"does not accept option '([\w.]+)'", message):
        hints.append(did_you_mean(option, options))
    for args in re.findall(r"nrecognized arguments: (.+)", message):
        hints += [did_you_mean(a.lstrip("-").split("=")[0], options) for a in args.split() if a.startswith("--")]
    hint = "".join(h for h in hints if h)
    return (message if not hint or message.endswith(".") else message + ".") + hint


class SuiteParser(LightningArgumentParser):
    """LightningCLI's parser with short error messages: the cause and a "did you mean", not the whole usage."""

    def error(self, message: str, ex: Exception | None = None):  # noqa: D102 (jsonargparse's signature)
        if not self.exit_on_error or show_tracebacks():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {readable_parse_error(message, parser)}\n"
                         f"  (`{prog} --help` lists every option; BOF_TRACEBACK=1 shows jsonargparse's full message)\n")
        raise SystemExit(USER_ERROR_EXIT_CODE)


# ------------------------------------------------------------------------------------------------ the CLI


def suite_module_classes() -> dict[str, type]:
    """The class paths a checkpoint may name: the suite's LightningModules, under their exported and their
    defining names (``lightning_modules.ClassifierModule`` and ``lightning_modules.classifier.ClassifierModule``)."""
    import lightning_modules  # the package this module belongs to: imported by now, nothing runs

    allowed = {}
    for name in lightning_modules.__all__:
        cls = getattr(lightning_modules, name)
        if isinstance(cls, type) and issubclass(cls, LightningModule):
            allowed[f"lightning_modules.{name}"] = cls
            allowed[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return allowed


class SuiteCLI(LightningCLI):
    """LightningCLI plus ``--run_dir`` and safe, checked ``--ckpt_path`` loading."""

    parse_only = False  # check_command's subclass stops after parsing

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="write logs, config and checkpoints (DIR/checkpoints) under DIR, whatever the "
                                 "config says (default: runs/<scale>/<experiment> of the last experiment config)")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self.config_files: list[str] = []
        if args is None or isinstance(args, list | tuple):
            argv = sys.argv[1:] if args is None else list(args)
            check_config_files(argv)
            self.config_files = config_files(argv)
        self.config = parser.parse_object(args) if isinstance(args, dict) else parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's: which loads only local files (Lightning's own loader then unpickles URLs with
        ``weights_only=False``), imports whatever class the checkpoint names and silently builds the checkpoint's
        model instead of the config's. Here every checkpoint is read with ``weights_only=True`` and checked; the
        config's model is the one built."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if "weights_only" in config:
            if config.weights_only is False:
                raise ConfigError("--weights_only false is refused: unpickling a checkpoint without restrictions can "
                                  "run code hidden in it. Checkpoints of this suite load with weights_only=True; "
                                  "leave the option out")
            config.weights_only = True  # also for URLs, where Lightning's default is False
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or self.parse_only:
            return
        ckpt_path = str(ckpt_path)
        if ckpt_path in LIGHTNING_SPECIAL_PATHS or ckpt_path.startswith("registry"):
            return  # Lightning finds its own checkpoint, and loads it with weights_only=True (set above)
        checkpoint = read_checkpoint(ckpt_path)
        check_class_path(checkpoint, ckpt_path, suite_module_classes())
        model = config.get("model")
        init_args = getattr(model, "init_args", None)
        if init_args is not None:
            others = check_network(checkpoint, ckpt_path, init_args.as_dict())
            if others:
                print(f"note: {ckpt_path} was trained with {', '.join(others)}; the config's values are used",
                      file=sys.stderr)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not config.get("run_dir"):
            config.run_dir = default_run_dir(self.config_files)
        if config.run_dir:
            check_creatable_dir(config.run_dir, "--run_dir")
            redirect_outputs(config.trainer, config.run_dir)  # also what the saved config.yaml records
        if self.parse_only:
            raise ParsedOnly


def build_cli(args: Sequence[str] | None = None, cli_class: type[SuiteCLI] = SuiteCLI,
              parser_class: type[SuiteParser] = SuiteParser) -> SuiteCLI:
    """The suite's CLI on ``args`` (default: ``sys.argv``); it runs the subcommand."""
    return cli_class(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=Trainer,  # precision: auto
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_class=parser_class,
        args=None if args is None else list(args),
    )


def run_cli(args: Sequence[str] | None = None) -> SuiteCLI:
    """``train.py fit|validate|test``: the CLI, with user errors printed as one message and exit code 2, and a
    run stopped by SIGTERM exiting 143 (128 + 15): Lightning ends it with a bare SystemExit, exit code 0, which
    would tell the pipeline (or a cluster script) that an unfinished fit had finished."""
    try:
        return build_cli(args)
    except SIGTERMException:
        print("stopped by SIGTERM before the end: exit code 143", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    except Exception as err:
        user_error = user_error_in(err)
        if user_error is None or show_tracebacks():
            raise
        print(f"error: {user_error}\n  (BOF_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None


class CommandError(ConfigError):
    """A command that would not parse (raised instead of printing and exiting, for :func:`check_command`)."""


class _ParseOnlyParser(SuiteParser):
    def error(self, message: str, ex: Exception | None = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        raise CommandError(readable_parse_error(message, parser))


class _ParseOnlyCLI(SuiteCLI):
    parse_only = True

    def _set_seed(self) -> None:  # seeding is running, and it prints a line per command
        pass


def resolved_config(args: Sequence[str]) -> dict:
    """The config a ``train.py`` command (``fit --config ...``) resolves to, as a plain dict: parsed by the CLI's
    own parser with defaults and ``--run_dir`` applied, nothing built or loaded (raises :class:`CommandError` or
    the user error the command would stop with)."""
    resolved: list[dict] = []

    class Resolve(_ParseOnlyCLI):
        def before_instantiate_classes(self) -> None:
            try:
                super().before_instantiate_classes()
            except ParsedOnly:
                config = self.config[self.subcommand].as_dict()
                resolved.append({k: v for k, v in config.items() if k != "config"})
                raise

    check_config_files(list(args))
    with contextlib.suppress(ParsedOnly):
        build_cli(args, Resolve, _ParseOnlyParser)
    return resolved[0]


def check_command(args: Sequence[str]) -> str | None:
    """Parse one ``train.py`` command (``fit --config ...``) with the CLI's own parser, building nothing and
    loading no checkpoint: None if it parses, else the error the command would stop with."""
    try:
        resolved_config(args)
    except Exception as err:
        user_error = user_error_in(err)
        if user_error is None:
            raise
        return str(user_error)
    return None
