"""Budget policy: how many of a prompt's candidates to render, so a corpus-wide render budget goes where it buys most.

Called by the scorer stage per prompt (streaming: no look at other prompts), with a threshold calibrated before the
job from what the predictor recorded at training time. Pure functions: numpy only, no Ray, no torch.

The model. The user keeps the best of the rendered images (after rating), so rendering the top j candidates by
predicted score is worth E[max of their true scores]. Each candidate's true score is its prediction plus an error,
    true_i = predicted_i + error_i,   error_i ~ Normal(0, sigma^2), independent,
i.e. the predictor is taken as calibrated within a prompt (E[true | predicted] = predicted, which is what training on
squared error aims for). The marginal gain of the j-th render is then exact and needs no table:
    g_j = E[max(true_1..true_j)] - E[max(true_1..true_{j-1})] = E[(true_j - max(true_1..true_{j-1}))^+]
        = integral of F_{j-1}(x) * (1 - Phi((x - p_j) / sigma)) dx,   F_{j-1}(x) = prod_{i<j} Phi((x - p_i) / sigma)
computed on a grid (121 points over predicted_1 +- 8 sigma). g_j never increases with j (each added candidate has a
lower mean, the running maximum only grows), so "render while g_j >= threshold" is the same as equalising marginal
gains across prompts: for a given total number of renders, that is the allocation with the highest summed expectation.

How big sigma is for a prompt matters as much as the predicted spread s (np.std of its N predictions):
    sigma = sqrt(residual_std^2 + (residual_ratio * s)^2)
- residual_ratio: the part of the error that scales with the prompt. If predictions and true scores are jointly normal
  within a prompt with correlation rho, a calibrated predictor's spread is s = rho * true_spread and its error is
  true_spread * sqrt(1 - rho^2), so sigma = s * sqrt(1 - rho^2) / rho. Then every gain is proportional to s, and wide
  spread prompts get more renders, prompts whose seeds all look alike get min_renders.
- residual_std: an error floor that does not shrink with the spread. Alone, it sends renders the other way: when one
  candidate is predicted far ahead of the rest, a second render rarely beats it, and when all candidates are predicted
  alike, the error decides, so rendering several pays (the iid case, g_j = sigma * (e_j - e_{j-1}), with e_j the
  expected maximum of j standard normals).
Both come from validation prompts (`fit_residual_model`). With both at zero the predictor is taken as perfect: the top
prediction is the best image and extra renders gain nothing, so no threshold can spend a budget above min_renders.
(The simpler closed form sqrt(s^2 + sigma^2) * (e_j - e_{j-1}) ignores that the candidates are ranked: it prices the
second render of a prompt with one clear favourite like a second random draw, and so overspends there. In simulations
it did no better than this model anywhere, and worse than a fixed k when the error floor is large.)

Calibration. The threshold is set so that the mean number of renders per prompt equals the budget over the
distribution of predicted spreads the predictor recorded (`PredictorConfig.spread_quantiles`, see
`record_spread_quantiles`). Each recorded spread stands for `draws` synthetic prompts whose N predictions are a
standard normal sample rescaled to that spread (fixed seed, so calibration is deterministic). Since each prompt's gains
are non-increasing, the renders beyond min_renders over all synthetic prompts are exactly the gains above the threshold,
so the threshold is read off the sorted gains (no bisection): spend on the calibration sample is the budget up to
1 / (len(spreads) * draws) renders per prompt. On a real corpus spend is the budget only in expectation (as far as
its prompts resemble the predictor's held-out ones): `spend_summary` reports what was spent. A budget in images or
denoising steps converts to renders per prompt by dividing by the prompt count (and the steps per image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from actors.predictor.selection import keep_top_k

GRID_HALF_WIDTH = 8.0  # in units of sigma: Phi(-8) ~ 6e-16, so the integrals are exact to float precision
GRID_POINTS = 121  # step sigma/7.5: the integrands are smooth, so the error (~1e-8 sigma) is erfc's, not the grid's
CALIBRATION_DRAWS = 32  # synthetic prompts per recorded spread
CALIBRATION_SEED = 0
CHUNK = 64  # synthetic prompts per vectorised gain computation (bounds memory: CHUNK * N * GRID_POINTS floats)


def renders_for_prompt(
    predicted: np.ndarray,
    threshold: float,
    max_renders: int,
    min_renders: int = 1,
    residual_std: float = 0.0,
    residual_ratio: float = 0.0,
) -> int:
    """How many of this prompt's candidates to render: min_renders, then one more while its marginal gain >= threshold.

    `predicted`: the N candidates' predicted scores in the rater's units. Never more than N or max_renders.
    """
    predicted = _check_predicted(predicted)
    low, high = _check_bounds(min_renders, max_renders)
    high = min(high, len(predicted))
    low = min(low, high)
    if high == low:
        return low
    top = np.sort(predicted)[::-1][:high]
    sigma = _sigma(np.std(predicted), residual_std, residual_ratio)
    gains = marginal_gains(top[None, :], np.array([sigma]))[0]
    return low + _count_at_least(gains[low - 1 :], threshold)


@dataclass(frozen=True)
class BudgetRule:
    """The budget policy's rule for one run, calibrated once by the driver and handed to every scorer: keep the
    candidates whose predicted score may beat the best by the threshold, given the predictor's residual error."""

    threshold: float
    residual_std: float
    residual_ratio: float

    def keep(self, predicted: np.ndarray, max_renders: int, min_renders: int = 1) -> np.ndarray:
        return keep_budget(predicted, self.threshold, max_renders, min_renders, self.residual_std, self.residual_ratio)


def keep_budget(
    predicted: np.ndarray,
    threshold: float,
    max_renders: int,
    min_renders: int = 1,
    residual_std: float = 0.0,
    residual_ratio: float = 0.0,
) -> list[int]:
    """Indices of the candidates to render, best predicted first (ties to the lower index, as keep_top_k)."""
    count = renders_for_prompt(predicted, threshold, max_renders, min_renders, residual_std, residual_ratio)
    return keep_top_k(predicted, count)


def calibrate_threshold(
    spread_samples: np.ndarray,
    budget: float,
    n_candidates: int,
    max_renders: int,
    min_renders: int = 1,
    residual_std: float = 0.0,
    residual_ratio: float = 0.0,
    draws: int = CALIBRATION_DRAWS,
) -> float:
    """Threshold whose mean renders per prompt, over prompts with the sampled predicted spreads, is `budget`.

    `spread_samples`: predicted within-prompt stds standing for the corpus, equally weighted (the predictor's
    `spread_quantiles`). Returns inf when budget == min_renders (never render more) and 0.0 when budget == max_renders.
    """
    spreads = np.asarray(spread_samples, dtype=np.float64).ravel()
    if spreads.size == 0 or not np.all(np.isfinite(spreads)) or np.any(spreads < 0):
        raise ValueError(f"spread_samples: need at least one finite, non-negative spread (got {spread_samples!r}); "
                         "pass the predictor config's spread_quantiles, recorded by the train job")
    low, high = _check_bounds(min_renders, max_renders)
    if high > n_candidates:
        raise ValueError(f"max_renders {high} is more than n_candidates {n_candidates}; render at most N candidates")
    if not low <= budget <= high:
        raise ValueError(f"budget {budget} renders per prompt is outside [min_renders {low}, max_renders {high}]; "
                         "raise max_renders or lower the budget")
    prompts = spreads.size * draws
    extra = int(round((budget - low) * prompts))  # renders beyond min_renders, summed over the synthetic prompts
    if extra == 0:
        return math.inf
    if extra >= (high - low) * prompts:
        return 0.0
    if residual_std <= 0 and residual_ratio <= 0:
        raise ValueError(f"residual_std and residual_ratio are both 0: the predictor is then taken as perfect and no "
                         f"threshold spends more than min_renders {low}, not budget {budget}; pass the predictor's "
                         "validation residuals (config.metrics['residual_std'], ['residual_ratio'])")
    predictions = calibration_predictions(spreads, n_candidates, draws)
    sigma = _sigma(np.repeat(spreads, draws), residual_std, residual_ratio)
    gains = np.concatenate([
        marginal_gains(predictions[i : i + CHUNK, :high], sigma[i : i + CHUNK])[:, low - 1 :]
        for i in range(0, prompts, CHUNK)
    ]).ravel()
    ordered = np.sort(gains)[::-1]
    # Between the extra-th and the next gain, so float noise at run time does not flip the boundary prompts.
    return float((ordered[extra - 1] + ordered[extra]) / 2)


def calibration_predictions(spread_samples: np.ndarray, n_candidates: int,
                            draws: int = CALIBRATION_DRAWS) -> np.ndarray:
    """Synthetic predictions, (len(spreads) * draws, N) sorted best first: per spread, `draws` normal samples of N
    rescaled to exactly that std (np.std, as the scorer records it). Seeded: calibration is deterministic."""
    spreads = np.asarray(spread_samples, dtype=np.float64).ravel()
    rng = np.random.default_rng(CALIBRATION_SEED)
    z = rng.standard_normal((spreads.size * draws, n_candidates))
    z -= z.mean(axis=1, keepdims=True)
    std = z.std(axis=1, keepdims=True)
    z = np.divide(z, std, out=np.zeros_like(z), where=std > 0)
    return -np.sort(-z * np.repeat(spreads, draws)[:, None], axis=1)


def marginal_gains(top: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Marginal gains (B, m-1) of the 2nd..m-th render for B prompts, given their top m predictions sorted best first
    (B, m) and error stds (B,): entry j-2 is E[max of top j true scores] - E[max of top j-1]. Non-increasing in j."""
    top = np.asarray(top, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if top.shape[1] < 2:
        return np.zeros((top.shape[0], 0))
    safe = np.where(sigma > 0, sigma, 1.0)
    gaps = (top - top[:, :1]) / safe[:, None]  # <= 0: distance below the best prediction, in units of sigma
    u = np.linspace(-GRID_HALF_WIDTH, GRID_HALF_WIDTH, GRID_POINTS)
    step = u[1] - u[0]
    z = u[None, None, :] - gaps[:, :, None]  # (B, m, grid)
    below = np.cumprod(_normal_cdf(z[:, :-1]), axis=1)  # F_{j-1}: all of the first j-1 below x
    # Both ends of the integrand vanish (F ~ 0 at the left edge, 1 - Phi ~ 0 at the right), so a plain sum is trapezoid.
    gains = (below * _normal_sf(z[:, 1:])).sum(axis=2) * step * sigma[:, None]
    gains = np.where(sigma[:, None] > 0, np.maximum(gains, 0.0), 0.0)
    return np.minimum.accumulate(gains, axis=1)  # exact gains never rise; this removes float noise


def spend_summary(
    predictions: list[np.ndarray],
    threshold: float,
    budget: float,
    max_renders: int,
    min_renders: int = 1,
    residual_std: float = 0.0,
    residual_ratio: float = 0.0,
) -> dict:
    """Renders the rule spends on these prompts against the budget, for the run summary."""
    counts = np.array([renders_for_prompt(p, threshold, max_renders, min_renders, residual_std, residual_ratio)
                       for p in predictions], dtype=np.int64)
    prompts = len(counts)
    return {
        "prompts": prompts,
        "renders": int(counts.sum()),
        "budget_renders": budget * prompts,
        "renders_per_prompt": float(counts.mean()) if prompts else 0.0,
        "spend_ratio": float(counts.sum() / (budget * prompts)) if prompts else 0.0,
        "renders_histogram": {int(k): int(v) for k, v in zip(*np.unique(counts, return_counts=True))},
    }


def record_spread_quantiles(predictions: list[np.ndarray], count: int = 50) -> list[float]:
    """For the train job: `spread_quantiles` = the predicted within-prompt std (np.std, rater's units) at the
    probabilities (i + 0.5) / count, so the values are an equally weighted sample. Use held-out prompts: spreads on
    training prompts are inflated by fitting."""
    spreads = np.array([np.std(_check_predicted(p)) for p in predictions])
    if spreads.size == 0:
        raise ValueError("record_spread_quantiles: no prompts given")
    return [float(v) for v in np.quantile(spreads, (np.arange(count) + 0.5) / count)]


def fit_residual_model(predictions: list[np.ndarray], true_scores: list[np.ndarray]) -> tuple[float, float]:
    """For the train job: (residual_std, residual_ratio) fitted on validation prompts, from each prompt's predicted
    spread s (np.std) and within-prompt residual std r (true minus predicted, each centred on the prompt's mean,
    since a per-prompt offset does not change which seed is best): least squares of r^2 = residual_std^2 +
    residual_ratio^2 * s^2 weighted for relative error, both coefficients kept non-negative."""
    if len(predictions) != len(true_scores) or not predictions:
        raise ValueError(f"fit_residual_model: need as many true-score arrays as prediction arrays, at least one "
                         f"(got {len(predictions)} and {len(true_scores)})")
    s2, r2 = [], []
    for predicted, true in zip(predictions, true_scores):
        predicted, true = _check_predicted(predicted), np.asarray(true, dtype=np.float64)
        if true.shape != predicted.shape or predicted.size < 2:
            raise ValueError(f"fit_residual_model: a prompt has {predicted.size} predictions and {true.size} true "
                             "scores; need the same number, at least 2")
        residual = (true - true.mean()) - (predicted - predicted.mean())
        s2.append(np.var(predicted))
        r2.append(np.var(residual, ddof=1))
    s2, r2 = np.array(s2), np.array(r2)
    # r^2 scatters around its mean in proportion to that mean (a chi-square), and spreads span orders of magnitude:
    # plain least squares would be ruled by the few widest prompts, so weigh each by 1 / (its modelled r^2)^2.
    floor, slope = 0.0, float(r2.mean() / max(s2.mean(), 1e-300))
    for _ in range(20):
        weight = 1.0 / np.maximum(floor + slope * s2, 1e-300) ** 2
        floor, slope = _nonnegative_line(s2, r2, weight)
    return float(math.sqrt(floor)), float(math.sqrt(slope))


def _nonnegative_line(x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """Weighted least squares y = a + b x with a, b >= 0."""
    design = np.stack([np.ones_like(x), x], axis=1) * np.sqrt(weight)[:, None]
    (a, b), *_ = np.linalg.lstsq(design, y * np.sqrt(weight), rcond=None)
    if a >= 0 and b >= 0:
        return float(a), float(b)
    if b < 0 or not np.any(x > 0):
        return float(np.sum(weight * y) / np.sum(weight)), 0.0
    return 0.0, float(np.sum(weight * x * y) / np.sum(weight * x * x))


def _sigma(spread, residual_std: float, residual_ratio: float):
    return np.sqrt(residual_std**2 + (residual_ratio * np.asarray(spread, dtype=np.float64)) ** 2)


def _count_at_least(gains: np.ndarray, threshold: float) -> int:
    """Renders while the gain holds: the gains are non-increasing, so the first one below the threshold stops."""
    below = np.flatnonzero(gains < threshold)
    return int(below[0]) if below.size else len(gains)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * _erfc(-x / math.sqrt(2.0))


def _normal_sf(x: np.ndarray) -> np.ndarray:
    return 0.5 * _erfc(x / math.sqrt(2.0))


def _erfc(x: np.ndarray) -> np.ndarray:
    """Complementary error function, relative error < 1.2e-7 everywhere (Numerical Recipes' erfcc): no scipy needed."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    tail = t * np.exp(-z * z + poly)
    return np.where(x >= 0, tail, 2.0 - tail)


def _check_predicted(predicted: np.ndarray) -> np.ndarray:
    values = np.asarray(predicted, dtype=np.float64).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"predicted scores: need at least one, all finite (got {values.size} values, "
                         f"{int(np.sum(~np.isfinite(values)))} not finite); check the predictor's output")
    return values


def _check_bounds(min_renders: int, max_renders: int) -> tuple[int, int]:
    if not 1 <= min_renders <= max_renders:
        raise ValueError(f"min_renders {min_renders}, max_renders {max_renders}: need 1 <= min_renders <= max_renders")
    return int(min_renders), int(max_renders)
