"""Every command of a reproduction parsed before the first one runs: a typo in a stage's config or in
``--stage-args`` costs seconds, not the hours of the stages before it.

Train commands are parsed by the suite's LightningCLI parser (``lightning_modules.cli.check_command``: nothing is
built and no checkpoint is read, so commands that use checkpoints of stages yet to run parse too); measure
commands by ``pipeline.measure``'s argparse parser; an import (``--use``) by reading its file, without running
any code in it (``models.imported``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

from pipeline.stages import IMPORT_MODULE_NAME, MEASURE_MODULE_NAME, TRAIN_PY


def command_error(argv: Sequence[str]) -> str | None:
    """The error ``argv`` (as ``pipeline.stages.commands`` builds it) would stop with; None if it parses."""
    argv = list(argv)
    if argv[1:3] == ["-m", MEASURE_MODULE_NAME]:
        from pipeline.measure import parser

        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser().parse_args(argv[3:])
        except SystemExit:
            lines = stderr.getvalue().strip().splitlines()
            return lines[-1] if lines else "its arguments do not parse"
        return None
    if argv[1:3] == ["-m", IMPORT_MODULE_NAME]:
        from models.checkpoints import CheckpointError
        from models.imported import network_of

        try:
            network_of(argv[3])
        except CheckpointError as err:
            return str(err)
        return None
    if argv[1:2] == [str(TRAIN_PY)]:
        from lightning_modules.cli import check_command

        return check_command(argv[2:])
    raise ValueError(f"not a command of a stage: {argv[:3]}")
