"""A Weights & Biases logger that never prompts and never hangs: online with a key and a network, otherwise
offline (runs are written under ``save_dir/wandb`` and can be uploaded later with ``wandb sync``)."""

from __future__ import annotations

import netrc
import os
import socket

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class WandbLoggerWithFallback(WandbLogger):
    """``WandbLogger`` that falls back to offline mode, with a message saying why, when there is no API key or
    no network (or when ``offline=True`` or ``WANDB_MODE=offline``)."""

    def __init__(self, *args, offline: bool | None = None, **kwargs) -> None:
        if offline is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun")
            if not offline and not _has_wandb_key():
                rank_zero_warn("wandb: no API key (WANDB_API_KEY or `wandb login`); logging offline. "
                               "Upload later with `wandb sync <save_dir>/wandb/offline-run-*`.")
                offline = True
            elif not offline and not _reachable():
                rank_zero_warn("wandb: api.wandb.ai is unreachable; logging offline. "
                               "Upload later with `wandb sync <save_dir>/wandb/offline-run-*`.")
                offline = True
        if offline:
            os.environ["WANDB_MODE"] = "offline"  # belt and braces: wandb never prompts in offline mode
        os.environ.setdefault("WANDB_SILENT", "true")
        super().__init__(*args, offline=offline, **kwargs)
