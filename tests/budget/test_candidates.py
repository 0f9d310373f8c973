"""Candidate ranks of the SVD curves: multiples of the rank multiple where enough of them fit."""

from onnxcomp.budget.candidates import MIN_MULTIPLES, candidate_ranks
from onnxcomp.config import RANK_MULTIPLE


def test_candidate_ranks_round_to_multiples_only_where_enough_fit():
    assert MIN_MULTIPLES == 4 and RANK_MULTIPLE == 8
    assert candidate_ranks(57, 128, RANK_MULTIPLE) == [8, 16, 24, 32, 40, 48, 56]
    assert candidate_ranks(32, 128, RANK_MULTIPLE) == [8, 16, 24, 32]
    assert candidate_ranks(28, 128, RANK_MULTIPLE) == list(range(1, 29))  # 8, 16, 24: too few: every rank
    assert candidate_ranks(28, 128, 8) == [8, 16, 24]  # a multiple the user asked for is kept
    assert candidate_ranks(7, 128, 8) == []  # not even one fits: the layer stays dense, the multiple kept
    assert candidate_ranks(7, 128, RANK_MULTIPLE) == list(range(1, 8))  # the default gives way
    assert candidate_ranks(28, 128, None) == list(range(1, 29))
    assert candidate_ranks(100, 5, None) == [1, 26, 50, 75, 100]
    assert candidate_ranks(0, 128, 8) == []
