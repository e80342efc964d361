"""Entry point of the suite: ``python train.py {fit,validate,test} --config configs/<...>.yaml``.

Model and data are chosen by class path in the config; every key can be overridden on the command line
(``--print_config`` shows them all). Scale out with ``--trainer.accelerator gpu --trainer.devices 8
--trainer.strategy ddp``. ``--run_dir DIR`` sends everything a run writes (logs, config, checkpoints) to DIR, so
one config can be run several times side by side (e.g. ``--seed_everything 3 --run_dir runs/mini/seed_3``).

``python train.py reproduce --preset mini`` runs the whole reproduction (see ``pipeline/``).
"""

from __future__ import annotations

import sys
from typing import Any

# Attacks run inside validate/test, and torch.inference_mode cannot be undone by enable_grad (spec 7).
TRAINER_DEFAULTS = {"inference_mode": False}


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


def main(args: list[str] | None = None) -> Any:
    """``reproduce`` goes to the pipeline; anything else to LightningCLI (fit / validate / test)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["reproduce"]:  # before importing Lightning: the pipeline itself needs none of it
        from pipeline.cli import main as reproduce

        return reproduce(argv[1:])

    from pytorch_lightning import LightningDataModule, LightningModule
    from pytorch_lightning.cli import LightningCLI

    class SuiteCLI(LightningCLI):  # defined here so that `reproduce` never waits for Lightning's import
        """LightningCLI plus ``--run_dir``."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_dir", type=str | None, default=None,
                                help="write logs, config and checkpoints (DIR/checkpoints) under DIR, "
                                     "whatever the config says")

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            if config.get("run_dir"):
                redirect_outputs(config.trainer, config.run_dir)  # also what the saved config.yaml records

    return SuiteCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
