"""The budget policy: per-prompt render counts from a calibrated threshold, and what they buy against a fixed k."""

import math

import numpy as np
import pytest

from actors.predictor.budget import (
    calibrate_threshold,
    calibration_predictions,
    fit_residual_model,
    keep_budget,
    marginal_gains,
    record_spread_quantiles,
    renders_for_prompt,
    spend_summary,
)
from actors.predictor.selection import keep_top_k

RATIO = math.sqrt(1 - 0.5**2) / 0.5  # the error a calibrated predictor with within-prompt correlation 0.5 leaves


def spread_prompt(spread: float, count: int = 16, seed: int = 0) -> np.ndarray:
    """A prompt's predictions with exactly this np.std."""
    z = np.random.default_rng(seed).standard_normal(count)
    return 3.0 + spread * (z - z.mean()) / z.std()


def test_gains_match_known_values():
    # Identical predictions: the iid case, e_2 - e_1 = 1/sqrt(pi), e_3 - e_2 = 1/(2 sqrt(pi)), scaled by sigma.
    gains = marginal_gains(np.zeros((1, 3)), np.array([2.0]))[0]
    assert gains == pytest.approx([2 / math.sqrt(math.pi), 1 / math.sqrt(math.pi)], rel=1e-5)
    # Ranked candidates: against a Monte Carlo of the same model.
    rng = np.random.default_rng(1)
    top = np.sort(rng.standard_normal(6))[::-1]
    true = top + 0.7 * rng.standard_normal((200_000, 6))
    simulated = np.diff(np.maximum.accumulate(true, axis=1).mean(axis=0))
    assert marginal_gains(top[None], np.array([0.7]))[0] == pytest.approx(simulated, abs=4e-3)
    assert np.all(np.diff(marginal_gains(top[None], np.array([0.7]))[0]) <= 0)


def test_higher_threshold_fewer_renders():
    predicted = spread_prompt(1.0)
    counts = [renders_for_prompt(predicted, t, 16, 1, 0.1, RATIO) for t in (0.0, 0.01, 0.05, 0.2, 0.5, 2.0, math.inf)]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 16 and counts[-1] == 1 and len(set(counts)) > 3


def test_wider_spread_more_renders():
    counts = [renders_for_prompt(spread_prompt(s), 0.1, 16, 1, 0.0, RATIO) for s in (0.05, 0.2, 0.5, 1.0, 3.0)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_error_floor_alone_favours_prompts_without_a_clear_favourite():
    # Same predictor error everywhere: a far-ahead top candidate is rarely beaten, alike candidates often are.
    alike = renders_for_prompt(spread_prompt(0.01), 0.05, 16, 1, 0.5)
    one_favourite = renders_for_prompt(spread_prompt(5.0), 0.05, 16, 1, 0.5)
    assert alike > one_favourite


def test_identical_predictions_get_min_renders():
    assert renders_for_prompt(np.full(16, 0.4), 1e-6, 8, 2, 0.0, RATIO) == 2
    assert keep_budget(np.full(16, 0.4), 1e-6, 8, 2, 0.0, RATIO) == [0, 1]


def test_bounds_respected():
    for spread in (0.0, 0.3, 1.0, 10.0):
        for threshold in (0.0, 0.1, math.inf):
            count = renders_for_prompt(spread_prompt(spread), threshold, 6, 2, 0.2, RATIO)
            assert 2 <= count <= 6
    assert renders_for_prompt(spread_prompt(1.0, count=3), 0.0, 8, 1, 0.2, RATIO) == 3  # never more than N
    with pytest.raises(ValueError, match="min_renders"):
        renders_for_prompt(spread_prompt(1.0), 0.1, 2, 3)
    with pytest.raises(ValueError, match="not finite"):
        renders_for_prompt(np.array([1.0, np.nan]), 0.1, 2)


def test_keep_budget_is_top_predicted_first():
    predicted = spread_prompt(1.0)
    chosen = keep_budget(predicted, 0.1, 16, 1, 0.1, RATIO)
    assert chosen == keep_top_k(predicted, len(chosen))
    assert len(chosen) == renders_for_prompt(predicted, 0.1, 16, 1, 0.1, RATIO)


@pytest.mark.parametrize("budget", [1.3, 2.0, 3.5])
def test_calibration_hits_budget_on_calibration_sample(budget):
    spreads = np.exp(0.7 * np.random.default_rng(3).standard_normal(40))
    threshold = calibrate_threshold(spreads, budget, 16, 8, 1, 0.1, RATIO)
    sample = calibration_predictions(spreads, 16)
    spent = np.mean([renders_for_prompt(p, threshold, 8, 1, 0.1, RATIO) for p in sample])
    assert spent == pytest.approx(budget, rel=0.02)


def test_budget_at_the_bounds():
    spreads = np.linspace(0.1, 2.0, 20)
    prompts = [spread_prompt(s, seed=i) for i, s in enumerate(spreads)] + [np.full(16, 1.0)]
    low = calibrate_threshold(spreads, 2, 16, 6, 2, 0.1, RATIO)
    assert all(renders_for_prompt(p, low, 6, 2, 0.1, RATIO) == 2 for p in prompts)
    high = calibrate_threshold(spreads, 6, 16, 6, 2, 0.1, RATIO)
    assert all(renders_for_prompt(p, high, 6, 2, 0.1, RATIO) == 6 for p in prompts)
    with pytest.raises(ValueError, match="budget 7"):
        calibrate_threshold(spreads, 7, 16, 6, 2, 0.1, RATIO)
    with pytest.raises(ValueError, match="residual_std and residual_ratio are both 0"):
        calibrate_threshold(spreads, 3, 16, 6, 2)


def synthetic_prompts(rng: np.random.Generator, prompts: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts whose true within-prompt spread varies (lognormal), scored by a calibrated predictor with within-prompt
    correlation 0.5 plus an error floor: true = predicted + noise."""
    true_spread = np.exp(0.8 * rng.standard_normal(prompts))
    predicted = rng.normal(5.0, 1.0, (prompts, 1)) + 0.5 * true_spread[:, None] * rng.standard_normal((prompts, count))
    error = np.sqrt(0.75 * true_spread**2 + 0.2**2)
    return predicted, predicted + error[:, None] * rng.standard_normal((prompts, count))


def mean_best_rendered(predicted: np.ndarray, true: np.ndarray, counts) -> float:
    return float(np.mean([true[k, keep_top_k(p, c)].max() for k, (p, c) in enumerate(zip(predicted, counts))]))


def test_budget_beats_fixed_k_at_equal_spend():
    rng = np.random.default_rng(0)
    candidates, budget, max_renders = 16, 2.0, 8
    # What the train job records, from held-out prompts ...
    held_predicted, held_true = synthetic_prompts(rng, 400, candidates)
    residual_std, residual_ratio = fit_residual_model(list(held_predicted), list(held_true))
    assert residual_ratio == pytest.approx(RATIO, rel=0.2)
    quantiles = record_spread_quantiles(list(held_predicted))
    # ... what the job calibrates before it starts, and what its scorers then decide prompt by prompt.
    threshold = calibrate_threshold(np.array(quantiles), budget, candidates, max_renders, 1,
                                    residual_std, residual_ratio)
    predicted, true = synthetic_prompts(rng, 3000, candidates)
    counts = [renders_for_prompt(p, threshold, max_renders, 1, residual_std, residual_ratio) for p in predicted]
    summary = spend_summary(list(predicted), threshold, budget, max_renders, 1, residual_std, residual_ratio)
    assert summary["renders"] == sum(counts) and summary["spend_ratio"] == pytest.approx(1.0, abs=0.06)
    # Fixed k at the same spend: a mix of k=2 and k=3 prompts is worth the linear interpolation in expectation.
    spend = summary["renders_per_prompt"]
    k = int(spend)
    fixed = {j: mean_best_rendered(predicted, true, [j] * len(predicted)) for j in (1, k, k + 1)}
    fixed_at_spend = fixed[k] + (spend - k) * (fixed[k + 1] - fixed[k])
    improvement = mean_best_rendered(predicted, true, counts) - fixed_at_spend
    print(f"budget {budget}: spend {spend:.3f}/prompt, best-rendered {fixed_at_spend:.3f} (fixed k) -> "
          f"{fixed_at_spend + improvement:.3f} (budget), +{improvement:.3f} = "
          f"{improvement / (fixed[2] - fixed[1]):.0%} of the k=1 -> k=2 gain")
    assert improvement > 0
