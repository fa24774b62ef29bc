"""Ranking and selection metrics on hand-checkable cases: perfect, reversed and partly right predictors, and ties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from actors.predictor.metrics import (
    average_ranks,
    gain_curve,
    ndcg_at_k,
    per_prompt_spearman,
    renders_for_equal_quality,
    spearman,
    top1_gain,
)

ACTUAL = np.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0])


def test_average_ranks_share_the_mean_rank_on_ties():
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert average_ranks([7, 7, 7]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_perfect_reversed_and_monotone_transform():
    assert spearman(ACTUAL, ACTUAL) == pytest.approx(1.0)
    assert spearman(ACTUAL, -ACTUAL) == pytest.approx(-1.0)
    assert spearman(np.exp(ACTUAL), ACTUAL) == pytest.approx(1.0)  # ranks only


def test_spearman_with_ties_matches_the_hand_computation():
    # ranks x = 1, 2.5, 2.5, 4 and y = 1, 2, 3, 4: centred dot 4.5 over sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)


def test_spearman_is_nan_when_a_side_is_constant_or_too_short():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))
    assert math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_per_prompt_spearman_one_value_per_prompt():
    groups = [(ACTUAL, ACTUAL), (-ACTUAL, ACTUAL), (np.ones(8), ACTUAL)]
    values = per_prompt_spearman(groups)
    assert values[:2] == pytest.approx([1.0, -1.0])
    assert math.isnan(values[2])


def test_ndcg_perfect_reversed_and_hand_case():
    assert ndcg_at_k(ACTUAL, ACTUAL, 1) == pytest.approx(1.0)
    assert ndcg_at_k(ACTUAL, ACTUAL, 3) == pytest.approx(1.0)
    assert ndcg_at_k(-ACTUAL, ACTUAL, 1) == pytest.approx(0.0)  # picks the worst: relevance 0
    # relevance 0, .5, 1; predicted order 1, 2, 0: DCG@2 = .5 + 1/log2(3), ideal = 1 + .5/log2(3)
    expected = (0.5 + 1 / math.log2(3)) / (1 + 0.5 / math.log2(3))
    assert ndcg_at_k([0, 2, 1], [0, 1, 2], 2) == pytest.approx(expected)
    # NDCG@1 is the min-max relevance of the pick.
    assert ndcg_at_k([0, 0, 1, 0], [10, 20, 15, 30], 1) == pytest.approx(0.25)
    # k beyond N is clipped; constant ratings measure nothing.
    assert ndcg_at_k(ACTUAL, ACTUAL, 100) == pytest.approx(1.0)
    assert math.isnan(ndcg_at_k([1, 2, 3], [5, 5, 5], 1))


def test_top1_gain_hand_case():
    result = top1_gain([0, 1, 2, 3], [1, 2, 3, 6])
    assert result["pick"] == 3
    assert result["gain"] == pytest.approx(3.0)  # 6 - mean 3
    assert result["gain_std_units"] == pytest.approx(3.0 / math.sqrt(14 / 4))  # population std
    assert result["picked_best"] is True
    assert result["chance_best"] == pytest.approx(0.25)
    worst = top1_gain([3, 2, 1, 0], [1, 2, 3, 6])
    assert worst["gain"] == pytest.approx(-2.0) and worst["picked_best"] is False


def test_top1_gain_ties():
    # Tied predictions go to the lower candidate index, as keep_top_k does.
    assert top1_gain([5, 5, 1], [1, 2, 3])["pick"] == 0
    # Tied best ratings: either one counts as the best, and chance is 2/3.
    tied = top1_gain([0, 1, 0], [2, 2, 1])
    assert tied["picked_best"] is True and tied["chance_best"] == pytest.approx(2 / 3)
    # No spread in the ratings: the gain is 0 and the std-unit gain undefined.
    flat = top1_gain([1, 2, 3], [4, 4, 4])
    assert flat["gain"] == 0.0 and math.isnan(flat["gain_std_units"]) and flat["picked_best"] is True


def test_gain_curve_perfect_predictor_matches_the_oracle():
    rng = np.random.default_rng(0)
    groups = [(a, a) for a in rng.normal(size=(5, 8))]
    curve = gain_curve(groups, [1, 2, 4, 8])
    assert [point["n"] for point in curve] == [1, 2, 4, 8]
    for point in curve:
        assert point["predictor"] == pytest.approx(point["oracle"])
        assert point["prompts"] == 5
    first = np.mean([a[0] for _, a in groups])
    assert curve[0]["predictor"] == curve[0]["random"] == curve[0]["oracle"] == pytest.approx(first)
    assert curve[-1]["random"] == pytest.approx(np.mean([a.mean() for _, a in groups]))
    oracle = [point["oracle"] for point in curve]
    assert oracle == sorted(oracle)  # best of a longer prefix is never worse


def test_gain_curve_uses_the_prefix_and_reversed_predictor_takes_the_worst():
    actual = np.array([1.0, 5.0, 2.0, 9.0])
    curve = gain_curve([(-actual, actual)], [1, 2, 4])
    assert [p["predictor"] for p in curve] == [1.0, 1.0, 1.0]
    assert [p["oracle"] for p in curve] == [1.0, 5.0, 9.0]
    assert [p["random"] for p in curve] == [1.0, 3.0, 4.25]
    with pytest.raises(ValueError):
        gain_curve([(-actual, actual)], [8])


def test_renders_for_equal_quality_interpolates_in_n():
    curve = [{"n": 1, "oracle": 1.0}, {"n": 2, "oracle": 2.0}, {"n": 4, "oracle": 3.0}]
    assert renders_for_equal_quality(curve, 2.5) == pytest.approx(3.0)
    assert renders_for_equal_quality(curve, 3.0) == pytest.approx(4.0)
    assert renders_for_equal_quality(curve, 1.5) == pytest.approx(1.5)
    assert renders_for_equal_quality(curve, 0.5) == pytest.approx(1.0)  # best-of-1 already reaches it
    assert renders_for_equal_quality(curve, 3.5) is None  # beyond the curve
    assert renders_for_equal_quality([], 1.0) is None
