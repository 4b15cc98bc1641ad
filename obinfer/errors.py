"""The one base class of every error a user can fix.

Each module defines its own subclass (``ConfigError``, ``PressError``, ``CheckpointError``, ...). The
CLI catches :class:`ObinferError` and prints its message as one line; library users can catch it too.
Messages name the problem and, where there is one, the file or option at fault.
"""

from __future__ import annotations


class ObinferError(Exception):
    """An error caused by the input (a file, a config, an option), not by a bug in obinfer."""


class UserError(ObinferError):
    """A bad argument or file given by the user (raised by the CLI and the library's front doors)."""


class MissingExtraError(ObinferError, ImportError):
    """An optional dependency (the ``eval`` extra: plots, task word lists) is not installed."""


def require(module: str, extra: str = "eval", what: str = "this command") -> None:
    """Raise :class:`MissingExtraError` naming the pip command, unless ``module`` can be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"{what} needs {module}: pip install 'obinfer[{extra}]' (or pip install -e '.[{extra}]')"
        )
