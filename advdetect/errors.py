"""User-facing errors.

Every problem a user can fix (a bad path, an unknown name, a corrupt file) is raised as
:class:`AdvDetectError`; a bad option value as :class:`OptionError`, which is also a
``ValueError`` for library callers. The CLI prints their message on one line and exits with
code 2, as it does for click's usage errors and for OS errors on paths the user gave; anything
else (a plain ``ValueError`` or ``OSError`` included) is an internal error, exit code 1.
"""

from __future__ import annotations


class AdvDetectError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class OptionError(AdvDetectError, ValueError):
    """A bad option value (out of range, unknown choice, inconsistent with another option)."""


class DataNotFoundError(AdvDetectError):
    """No dataset was found where we looked."""


class UnknownNameError(OptionError):
    """An unknown model, attack or dataset name; the message lists the valid choices."""

    def __init__(self, kind: str, name: str, choices: list[str]) -> None:
        self.kind, self.name, self.choices = kind, name, list(choices)
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(self.choices)}")
