"""The value checks every config key goes through, and the one error they raise.

A refused value raises `ConfigError` naming the key, the value and what is accepted; the
command line prints that one line (harness/run.py `main`)."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A value outside what is accepted; the message names the key and the accepted values."""


def one_of(key: str, value, accepted) -> None:
    if value not in accepted:
        raise ConfigError(f"{key}={value!r} is not accepted; accepted: {', '.join(map(str, accepted))}")


def integer(key: str, value, low: int, none: str | None = None) -> None:
    """An integer >= low (bool is not one); `none` says what null means where null is allowed."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        accepted = f"an integer >= {low}" + (f", or null ({none})" if none else "")
        raise ConfigError(f"{key}={value!r}; accepted: {accepted}")


def number(key: str, value, low: float, high: float | None = None, *, open_low: bool = False,
           none: str | None = None) -> float | None:
    """A finite real number in [low, high] (`open_low`: low itself refused); nan and inf are
    refused by name (they pass `<` comparisons silently); `none`: what null means where allowed."""
    if value is None and none:
        return None
    bad_type = isinstance(value, bool) or not isinstance(value, int | float)
    if bad_type or not math.isfinite(value) or value < low or (open_low and value == low) or \
            (high is not None and value > high):
        accepted = (f"a finite number {'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
                    + (f", or null ({none})" if none else ""))
        raise ConfigError(f"{key}={value!r}; accepted: {accepted}")
    return float(value)
