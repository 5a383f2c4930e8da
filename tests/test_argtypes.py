"""The flag types of :mod:`pyrovae.argtypes`."""

import argparse

import pytest

from pyrovae.argtypes import non_negative_int, positive_float, positive_int


def test_positive_int_takes_one_and_up():
    assert positive_int("1") == 1
    assert positive_int("5000") == 5000
    for bad, message in (("0", "positive integer, got 0"), ("-3", "got -3"),
                         ("2.5", "got '2.5'"), ("ten", "got 'ten'")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            positive_int(bad)


def test_non_negative_int_takes_zero_and_up():
    assert non_negative_int("0") == 0
    assert non_negative_int("7") == 7
    with pytest.raises(argparse.ArgumentTypeError, match="non-negative integer, got -1"):
        non_negative_int("-1")


def test_positive_float_takes_finite_numbers_above_zero():
    assert positive_float("0.1") == 0.1
    assert positive_float("3") == 3.0
    for bad, message in (("0", "positive number, got 0.0"), ("-0.5", "got -0.5"),
                         ("nan", "got nan"), ("inf", "got inf"), ("big", "got 'big'")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            positive_float(bad)
