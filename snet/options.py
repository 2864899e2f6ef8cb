"""Command-line options shared by snet's twistd plugins.

Every option can also come from the environment (for containers): an option given on the
command line wins, then its environment variable, then the default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.python import usage


def positive_float(text: str) -> float:
    """Coerce an option to a number of seconds greater than zero."""
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{text!r} is not a positive number")
    return value


positive_float.coerceDoc = "A positive number of seconds."  # type: ignore[attr-defined]


def non_negative_float(text: str) -> float:
    """Coerce an option to a number of seconds, zero allowed."""
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a number of seconds >= 0")
    return value


non_negative_float.coerceDoc = "A number of seconds, zero or more."  # type: ignore[attr-defined]


class _NamedCoerceParameter(usage.CoerceParameter):
    """Like twistd's own, but its error names the option: ``--drain-timeout: ...``."""

    def dispatch(self, parameterName: str, value: str | None) -> None:  # noqa: N803
        try:
            super().dispatch(parameterName, value)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            detail = str(e).removeprefix("Parameter type enforcement failed: ")
            raise usage.UsageError(f"--{parameterName}: {detail}") from None


class EnvironmentOptions(usage.Options):
    """Options whose unset values are filled from environment variables.

    A subclass lists ``environment = {"option-name": "ENV_VAR", ...}`` and
    ``fallbacks = {"option-name": default}`` (not usage.Options' own ``defaults``). Coerce
    functions of ``optParameters`` apply to values from the environment too, and their errors
    name the variable.
    """

    optParameters: list[list[Any]] = []
    environment: Mapping[str, str] = {}
    fallbacks: Mapping[str, Any] = {}

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.environ = os.environ if environ is None else environ
        for name, handler in self._dispatch.items():
            if isinstance(handler, usage.CoerceParameter):
                self._dispatch[name] = _NamedCoerceParameter(self, handler.coerce)  # type: ignore[no-untyped-call]

    def fill_from_environment(self) -> None:
        coercers: dict[str, Callable[[str], Any] | None] = {
            p[0]: (p[4] if len(p) > 4 else None) for p in self.optParameters
        }
        for name, variable in self.environment.items():
            if self[name] is not None:
                continue
            raw = self.environ.get(variable)
            if raw:
                coerce = coercers.get(name)
                try:
                    self[name] = coerce(raw) if coerce else raw
                except ValueError as e:
                    raise usage.UsageError(f"{variable}={raw!r}: {e}") from None
            elif name in self.fallbacks:
                self[name] = self.fallbacks[name]

    def postOptions(self) -> None:
        self.fill_from_environment()
