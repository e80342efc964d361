"""Errors in what a user gave the suite (a config value, an argument, a file), as opposed to bugs.

Every such error is a :class:`UserError`: its message names the problem and the fix. ``train.py`` and
``reproduce`` print that message alone, without a traceback, and exit with code 2; any other exception keeps its
traceback. Set ``BOF_TRACEBACK=1`` to see the traceback of a user error too (for debugging the suite).
"""

from __future__ import annotations

import os

TRACEBACK_ENV = "BOF_TRACEBACK"
USER_ERROR_EXIT_CODE = 2
SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM: a run stopped before its end, as a shell reports a killed one


class UserError(Exception):
    """A mistake in the user's input; the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration value or argument that the suite refuses (a ValueError, so callers may catch either)."""


def user_error_in(err: BaseException) -> UserError | None:
    """The first :class:`UserError` in ``err``'s chain of causes and contexts (jsonargparse wraps the errors that
    classes raise while it instantiates them), or None if the chain holds none."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def show_tracebacks() -> bool:
    """Whether the user asked for tracebacks of user errors (``BOF_TRACEBACK=1``)."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")
