"""``argparse`` types for the command-line flags, with one-line messages that name the value."""

from __future__ import annotations

import argparse
import math


def _integer_at_least(text: str, minimum: int, kind: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
    return value


def positive_int(text: str) -> int:
    """``text`` as an integer >= 1, or an ``ArgumentTypeError`` that quotes it."""
    return _integer_at_least(text, 1, "positive")


def non_negative_int(text: str) -> int:
    """``text`` as an integer >= 0, or an ``ArgumentTypeError`` that quotes it."""
    return _integer_at_least(text, 0, "non-negative")


def positive_float(text: str) -> float:
    """``text`` as a finite number > 0, or an ``ArgumentTypeError`` that quotes it."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value
