"""Entry point of the suite: ``python train.py {fit,validate,test} --config configs/<...>.yaml``.

Model and data are chosen by class path in the config; every key can be overridden on the command line
(``--print_config`` shows them all). Scale out with ``--trainer.accelerator gpu --trainer.devices 8
--trainer.strategy ddp``. ``--run_dir DIR`` sends everything a run writes (logs, config, checkpoints) to DIR, so
one config can be run several times side by side (e.g. ``--seed_everything 3 --run_dir runs/mini/seed_3``).
The CLI itself (safe checkpoint loading, readable errors) is ``lightning_modules/cli.py``.

``python train.py reproduce --preset mini`` runs the whole reproduction (see ``pipeline/``).
"""

from __future__ import annotations

import sys
from typing import Any


def main(args: list[str] | None = None) -> Any:
    """``reproduce`` goes to the pipeline; anything else to LightningCLI (fit / validate / test)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["reproduce"]:  # before importing Lightning: the pipeline itself needs none of it
        from pipeline.cli import main as reproduce

        return reproduce(argv[1:])

    from lightning_modules.cli import run_cli

    return run_cli(args)


if __name__ == "__main__":
    main()
