"""``argparse`` types for the command-line flags, with one-line messages that name the value."""

from __future__ import annotations

import argparse
import math

#: the largest integer a flag takes: a C ``int``, what torch and numpy take for every size
#: and count (a larger one overflows inside them instead of being refused here)
MAX_INT = 2**31 - 1


def _integer_at_least(text: str, minimum: int, kind: str, maximum: float = MAX_INT) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
    if value > maximum:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer of at most {maximum}, "
                                         f"got {value}")
    return value


def integer(text: str) -> int:
    """``text`` as an integer from ``-MAX_INT`` to :data:`MAX_INT`, or an
    ``ArgumentTypeError`` that quotes it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if abs(value) > MAX_INT:
        raise argparse.ArgumentTypeError(f"expected an integer from {-MAX_INT} to {MAX_INT}, "
                                         f"got {value}")
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


#: the device types pyrovae runs on (``auto``: cuda when available, else cpu)
DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device_name(text: str) -> str:
    """``text`` if it names a device pyrovae can run on (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``, ``mps``), else a ``ValueError`` saying which names are accepted."""
    if text == "auto":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device {text!r} cannot hold the data and parameters of a run; use "
                         f"auto, cpu, cuda or cuda:N")
    return text


def device_name(text: str) -> str:
    """:func:`check_device_name` as an ``argparse`` type."""
    try:
        return check_device_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def seed(text: str) -> int:
    """``text`` as a random seed, an integer from 0 to 2**32 - 1 (numpy's range)."""
    value = _integer_at_least(text, 0, "non-negative", maximum=math.inf)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**32 = {2**32}, got {value}")
    return value


def init_gain(text: str) -> float | str:
    """``text`` as an initialisation gain: ``activation``, or a number > 0."""
    if text == "activation":
        return text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected 'activation' or a positive number, got {text!r}") from None


def positive_ints(text: str) -> tuple[int, ...]:
    """``text`` as comma-separated integers >= 1, e.g. ``1,5,50``."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"every K must be positive, got {text!r}")
    if any(value > MAX_INT for value in values):
        raise argparse.ArgumentTypeError(f"every K must be at most {MAX_INT}, got {text!r}")
    return values
