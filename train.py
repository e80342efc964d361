"""Entry point of the suite: ``python train.py {fit,validate,test} --config configs/<...>.yaml``.

Model and data are chosen by class path in the config; every key can be overridden on the command line
(``--print_config`` shows them all). Scale out with ``--trainer.accelerator gpu --trainer.devices 8
--trainer.strategy ddp``.
"""

from __future__ import annotations

from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import LightningCLI

# Attacks run inside validate/test, and torch.inference_mode cannot be undone by enable_grad (spec 7).
TRAINER_DEFAULTS = {"inference_mode": False}


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
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
