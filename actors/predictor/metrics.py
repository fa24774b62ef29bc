"""Ranking and selection metrics for a noise-quality predictor: pure numpy, no torch, no Ray.

Used by the train job (held-out figures) and the evaluate job (the report). A "group" is one prompt's candidates:
(predicted scores, rated scores), both in candidate_index order.

Conventions shared by every function here:
- The predictor's pick is the highest predicted score; ties go to the lower candidate index, as
  `actors.predictor.selection.keep_top_k` does, so the figures describe what a `--policy predictor` run renders.
- A figure that is undefined for a prompt (a constant side in a correlation, no spread in the rated scores) is
  NaN for that prompt; aggregates leave NaNs out and say how many prompts they used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Group = tuple[np.ndarray, np.ndarray]  # (predicted, actual) of one prompt, candidate_index order


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span (what scipy's rankdata calls "average")."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_ranks = (starts + ends + 1) / 2.0  # mean of the 1-based positions start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation with average ranks for ties; NaN when either side is constant or has < 2 values."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-D arrays of one length (got {x.shape} and {y.shape})")
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    rx = average_ranks(x) - (len(x) + 1) / 2.0
    ry = average_ranks(y) - (len(y) + 1) / 2.0
    return float(np.clip((rx @ ry) / np.sqrt((rx @ rx) * (ry @ ry)), -1.0, 1.0))


def per_prompt_spearman(groups: Sequence[Group]) -> np.ndarray:
    """Spearman within each prompt (NaN where undefined): how well the predictor orders one prompt's candidates."""
    return np.array([spearman(predicted, actual) for predicted, actual in groups], dtype=np.float64)


def predicted_order(predicted: Sequence[float]) -> np.ndarray:
    """Candidate indices from highest to lowest predicted score; ties to the lower index (keep_top_k's order)."""
    predicted = np.asarray(predicted, dtype=np.float64)
    return np.lexsort((np.arange(len(predicted)), -predicted))


def top1_index(predicted: Sequence[float]) -> int:
    """The candidate a predictor policy with k=1 renders."""
    return int(predicted_order(predicted)[0])


def ndcg_at_k(predicted: Sequence[float], actual: Sequence[float], k: int) -> float:
    """NDCG@k of one prompt's ranking by `predicted`, with graded relevance from `actual`.

    Relevance is the rated score min-max normalised within the prompt, (a - min) / (max - min), so the best
    candidate has relevance 1 and the worst 0 whatever the rater's units; gains are linear in relevance and
    discounted by 1 / log2(position + 1). NDCG@1 is therefore the relevance of the predictor's pick. NaN when all
    rated scores are equal (every order is ideal; nothing to measure). k larger than N is clipped to N.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if predicted.shape != actual.shape or actual.ndim != 1 or len(actual) == 0:
        raise ValueError(f"ndcg_at_k needs two non-empty 1-D arrays of one length (got {predicted.shape}, "
                         f"{actual.shape})")
    if k < 1:
        raise ValueError(f"ndcg_at_k: k must be at least 1 (got {k})")
    low, high = actual.min(), actual.max()
    if high == low:
        return float("nan")
    relevance = (actual - low) / (high - low)
    k = min(k, len(actual))
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = relevance[predicted_order(predicted)[:k]] @ discounts
    ideal = np.sort(relevance)[::-1][:k] @ discounts
    return float(dcg / ideal)


def top1_gain(predicted: Sequence[float], actual: Sequence[float]) -> dict:
    """What the predictor's pick gains over a random seed, for one prompt.

    gain: rated score of the pick minus the mean rated score of all candidates (the expected score of a random
    seed), in the rater's units. gain_std_units: the same divided by the prompt's population std of rated scores
    (NaN when that std is 0). picked_best: the pick has the highest rated score (ties count as best).
    chance_best: the probability that a random seed is a best one (1/N without ties).
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if predicted.shape != actual.shape or actual.ndim != 1 or len(actual) == 0:
        raise ValueError(f"top1_gain needs two non-empty 1-D arrays of one length (got {predicted.shape}, "
                         f"{actual.shape})")
    pick = top1_index(predicted)
    gain = float(actual[pick] - actual.mean())
    std = float(actual.std())
    best = actual.max()
    return {
        "pick": pick,
        "gain": gain,
        "gain_std_units": gain / std if std > 0 else float("nan"),
        "picked_best": bool(actual[pick] == best),
        "chance_best": float(np.mean(actual == best)),
    }


def gain_curve(groups: Sequence[Group], ns: Sequence[int]) -> list[dict]:
    """Mean rated score per prompt of three policies that see the first n candidates, for each n in `ns`.

    The first n candidates in candidate_index order are exactly what a run with `--candidates n` sees (seeds are
    a prefix), so this simulates such runs from one collect. Per point: predictor (the predictor's top-1 of n:
    one render), random (mean of the n: the expected score of one random seed, one render), oracle (the best of
    the n: render all n, rate them, keep the best: n renders), and the number of prompts. Every group must have
    at least max(ns) candidates.
    """
    groups = [(np.asarray(p, dtype=np.float64), np.asarray(a, dtype=np.float64)) for p, a in groups]
    if not groups:
        raise ValueError("gain_curve needs at least one prompt")
    shortest = min(len(a) for _, a in groups)
    curve = []
    for n in ns:
        n = int(n)
        if not 1 <= n <= shortest:
            raise ValueError(f"gain_curve: n={n} is outside 1..{shortest} (the fewest candidates of any prompt)")
        picked = [a[top1_index(p[:n])] for p, a in groups]
        curve.append({
            "n": n,
            "predictor": float(np.mean(picked)),
            "random": float(np.mean([a[:n].mean() for _, a in groups])),
            "oracle": float(np.mean([a[:n].max() for _, a in groups])),
            "prompts": len(groups),
        })
    return curve


def renders_for_equal_quality(curve: Sequence[dict], target: float) -> float | None:
    """Renders per prompt best-of-n needs for its mean score to reach `target`, interpolating linearly in n.

    Oracle best-of-n is non-decreasing in n, so this is the first crossing. Returns the curve's smallest n when
    best-of-that-n already reaches the target, and None when no point of the curve reaches it (more renders than
    the curve covers). With target = the predictor's top-1 mean score, the result divided by 1 (the predictor
    renders one image; scoring N noises costs next to nothing) is the compute best-of-n spends for equal quality.
    """
    points = sorted(curve, key=lambda point: point["n"])
    if not points:
        return None
    if points[0]["oracle"] >= target:
        return float(points[0]["n"])
    for before, after in zip(points[:-1], points[1:]):
        if after["oracle"] >= target:
            rise = after["oracle"] - before["oracle"]
            fraction = (target - before["oracle"]) / rise if rise > 0 else 1.0
            return float(before["n"] + fraction * (after["n"] - before["n"]))
    return None
