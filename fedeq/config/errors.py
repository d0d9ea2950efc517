"""The one error type of configuration problems."""

from __future__ import annotations

from typing import Any

__all__ = ["MISSING", "ConfigError"]

#: Shown as the value of a mandatory key that has none.
MISSING = "???"


def _show(value: Any) -> str:
    """Short one-line rendering of an offending value."""
    text = repr(value).replace("\r", " ").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


class ConfigError(ValueError):
    """Invalid configuration.

    ``key`` is the full dotted key (e.g. ``devices.tiers[1].f_max_iter``, or ``config`` /
    ``overrides`` for problems with the file or the override syntax). The message is one line:
    ``"<key>: <what is wrong>; allowed: <what is allowed> (got <value>)"``.
    """

    def __init__(self, key: str, problem: str, allowed: str, got: Any) -> None:
        self.key = key
        self.problem = problem
        self.allowed = allowed
        self.got = got
        message = f"{key}: {problem}; allowed: {allowed} (got {_show(got)})"
        super().__init__(" ".join(message.splitlines()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.problem, self.allowed, self.got))
