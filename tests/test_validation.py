"""Data checks at the entry points: the first problem named, finite data passed through."""

from __future__ import annotations

import pytest
import torch

from pyrovae.errors import InvalidDataError
from pyrovae.likelihoods import BernoulliLikelihood
from pyrovae.validation import check_data


@pytest.mark.parametrize("value, count, kind", [
    (float("nan"), 1, "NaN"), (float("inf"), 1, "infinite"), (-float("inf"), 2, "infinite")])
def test_non_finite_values_are_counted_and_named(value, count, kind):
    x = torch.rand(50, 7)
    x.view(-1)[torch.randperm(350)[:count]] = value
    with pytest.raises(InvalidDataError, match=f"x contains {count} non-finite values \\({kind}\\)"):
        check_data(x)


def test_opposite_infinities_are_found_although_they_cancel_in_no_sum():
    x = torch.zeros(4, 3)
    x[0, 0], x[3, 2] = float("inf"), -float("inf")
    with pytest.raises(InvalidDataError, match="2 non-finite values"):
        check_data(x)


def test_finite_data_whose_sum_overflows_pass():
    x = torch.full((8, 5), 3e38)  # every value finite; their float32 sum is inf
    assert not torch.isfinite(x.sum())
    assert check_data(x) is x


def test_the_likelihoods_support_is_checked_after_finiteness():
    with pytest.raises(InvalidDataError, match="binary data"):
        check_data(torch.full((2, 3), 0.5), likelihood=BernoulliLikelihood())
    x = torch.bernoulli(torch.full((6, 4), 0.5))
    assert check_data(x, data_dim=4, likelihood=BernoulliLikelihood()) is x
