"""The flag types of :mod:`pyrovae.argtypes`."""

import argparse

import pytest

from pyrovae.argtypes import (
    MAX_INT,
    integer,
    non_negative_int,
    positive_float,
    positive_int,
    positive_ints,
)
from pyrovae.cli import main


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


HUGE = "99999999999999999999"


def test_every_integer_type_is_bounded_by_a_c_int():
    assert positive_int(str(MAX_INT)) == MAX_INT == 2**31 - 1
    assert integer(str(-MAX_INT)) == -MAX_INT
    for parse in (positive_int, non_negative_int):
        with pytest.raises(argparse.ArgumentTypeError,
                           match=f"integer of at most 2147483647, got {HUGE}"):
            parse(HUGE)
        with pytest.raises(argparse.ArgumentTypeError, match="at most 2147483647, got 2147483648"):
            parse(str(MAX_INT + 1))
    with pytest.raises(argparse.ArgumentTypeError, match="from -2147483647 to 2147483647"):
        integer("-" + HUGE)
    with pytest.raises(argparse.ArgumentTypeError, match="every K must be at most 2147483647"):
        positive_ints("1," + HUGE)


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "x.pt", "--batch-size", HUGE], "argument --batch-size: expected a positive "
                                                 "integer of at most 2147483647"),
    (["evaluate", "x.pt", "--report", "--ais-temperatures", HUGE],
     "argument --ais-temperatures: expected a non-negative integer of at most"),
    (["evaluate", "x.pt", "--report", "--ais-chains", HUGE], "argument --ais-chains:"),
    (["evaluate", "x.pt", "--ks", "1," + HUGE], "argument --ks: every K must be at most"),
    (["sample", "x.pt", "--num-samples", HUGE], "argument --num-samples/-n: expected a "
                                                "positive integer of at most"),
    (["sample", "x.pt", "--label", HUGE], "argument --label: expected an integer from"),
    (["evaluate", "x.pt", "--report", "--ais-step-size", "0"],
     "argument --ais-step-size: expected a positive number, got 0.0"),
    (["evaluate", "x.pt", "--report", "--ais-step-size", "-1"], "got -1.0"),
    (["evaluate", "x.pt", "--report", "--ais-step-size", "nan"], "got nan"),
    (["evaluate", "x.pt", "--report", "--ais-step-size", "inf"], "got inf"),
    (["evaluate", "x.pt", "--report", "--ais-step-size", "1e400"], "got inf"),
])
def test_out_of_range_flags_are_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
