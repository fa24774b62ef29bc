"""Selection policies are plain functions."""

import numpy as np

from actors.predictor.selection import keep_first, keep_top_k


def test_keep_first_is_a_prefix():
    assert keep_first(8, 3) == [0, 1, 2]
    assert keep_first(2, 5) == [0, 1]


def test_top_k_best_first_with_stable_ties():
    assert keep_top_k(np.array([0.1, 0.9, 0.5, 0.9]), 3) == [1, 3, 2]
    assert keep_top_k(np.array([3.0, 1.0]), 1) == [0]
