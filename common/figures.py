"""The one path every figure of the suite takes: pyplot on the Agg backend (no display on clusters), a PNG
written under a temporary name and renamed (a reader never sees half a file), and the figure sent to the
TensorBoard / wandb loggers of a run."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.files import write_bytes_atomic


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | os.PathLike, *, dpi: int = 100, close: bool = True, **savefig: Any) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically (parents created); close it unless ``close=False``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    figure.savefig(png, dpi=dpi, format="png", **savefig)
    write_bytes_atomic(path, png.getvalue())
    if close:
        pyplot().close(figure)
    return path


def log_figure(loggers: Sequence[Any], tag: str, png: str | os.PathLike, *, figure: Any = None,
               step: int = 0) -> None:
    """Send a figure to every TensorBoard and wandb logger among ``loggers`` (others have no images): TensorBoard
    gets the matplotlib ``figure`` when given, else the pixels of ``png``, at ``step``; wandb gets the ``png``
    file at its own current step (an explicit older step would be dropped by wandb). A given ``figure`` is closed
    afterwards, whatever the loggers (pyplot keeps every open figure alive)."""
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger  # Lightning only where loggers are

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            if figure is not None:
                logger.experiment.add_figure(tag, figure, step, close=False)  # closed below, once
            else:
                import matplotlib.image

                logger.experiment.add_image(tag, matplotlib.image.imread(png)[..., :3], step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(tag, [str(png)])
    if figure is not None:
        pyplot().close(figure)
