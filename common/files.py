"""Checks on output paths, before anything is written."""

from __future__ import annotations

from pathlib import Path

from common.errors import ConfigError


def check_creatable_dir(path: str | Path, what: str) -> None:
    """Refuse a directory that cannot be created because something on its path is a regular file, before
    anything is written (``os.makedirs`` would fail later with a bare NotADirectoryError). ``what`` names the
    option in the message (``--run_dir``)."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {path} cannot be created: {parent} is a file, not a directory. Choose "
                                  "another directory")
            return
