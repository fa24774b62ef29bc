"""Per-shard statistics and their fold: what a summary (and the report) says about a whole output.

A complete shard keeps its statistics in its manifest object's footer; the summary folds those instead of
re-reading every row, so finishing a run costs the same at ten million rows as at ten thousand.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SKETCH_POINTS = 51  # quantiles kept per shard for a distribution (0, 2%, ..., 100%)
LISTED = 10  # prompts kept per list (hardest, most seed-sensitive)
REASONS = 20  # distinct quarantine / failure reasons kept per shard


def reason_of(error: str | None) -> str:
    """An error message without the parts that differ row by row, so reasons can be counted."""
    text = error or "unknown"
    text = re.sub(r"duplicate of \S+", "duplicate of an earlier row", text)
    text = re.sub(r"\d+", "N", text)
    return text[:160]


def sketch(values: np.ndarray) -> dict | None:
    """A mergeable summary of a distribution: its count, mean and SKETCH_POINTS quantiles."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    points = np.quantile(values, np.linspace(0, 1, SKETCH_POINTS))
    return {"n": int(len(values)), "mean": float(values.mean()), "q": [round(float(p), 6) for p in points]}


def merge_sketches(sketches: list[dict | None]) -> dict | None:
    """One sketch from many: each shard's quantile points stand for equal shares of its count."""
    sketches = [s for s in sketches if s]
    if not sketches:
        return None
    if len(sketches) == 1:
        return sketches[0]
    values = np.concatenate([np.asarray(s["q"]) for s in sketches])
    weights = np.concatenate([np.full(len(s["q"]), s["n"] / len(s["q"])) for s in sketches])
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    cumulative = (np.cumsum(weights) - weights / 2) / weights.sum()
    points = np.interp(np.linspace(0, 1, SKETCH_POINTS), cumulative, values)
    total = sum(s["n"] for s in sketches)
    return {"n": int(total), "mean": float(sum(s["mean"] * s["n"] for s in sketches) / total),
            "q": [round(float(p), 6) for p in points]}


def quantile(sketched: dict | None, q: float) -> float | None:
    if not sketched:
        return None
    return round(float(np.interp(q, np.linspace(0, 1, len(sketched["q"])), sketched["q"])), 4)


def shard_stats(table: pa.Table) -> dict:
    """Statistics of one shard's committed rows (any subset of manifest columns that has status)."""
    status = table["status"].to_pylist()
    counts = Counter(status)
    columns = set(table.column_names)
    stats: dict = {"rows": table.num_rows, "by_status": dict(sorted(counts.items()))}
    prompt_ids = table["prompt_id"].to_pylist() if "prompt_id" in columns else [None] * len(status)
    seeds = table["seed"].to_pylist() if "seed" in columns else [None] * len(status)
    delivered = {(p, s) for p, s, st in zip(prompt_ids, seeds, status) if st == "ok"}
    stats["prompts"] = len({p for p, st in zip(prompt_ids, status) if st in ("ok", "failed")})
    stats["images"] = counts.get("ok", 0)
    stats["failures"] = len({(p, s) for p, s, st in zip(prompt_ids, seeds, status) if st == "failed"} - delivered)
    if "error" in columns:
        errors = table["error"].to_pylist()
        for name, wanted in (("quarantine_reasons", "quarantined"), ("failure_reasons", "failed")):
            reasons = Counter(reason_of(e) for e, st in zip(errors, status) if st == wanted)
            stats[name] = dict(reasons.most_common(REASONS))
    ok = pc.equal(table["status"], "ok")
    if "steps" in columns:  # otherwise the summary counts images times the run's steps
        stats["steps_spent"] = _steps_spent(table.filter(ok), columns)
    if "score" in columns:
        stats["score"] = sketch(table["score"].filter(ok).to_numpy(zero_copy_only=False))
    if {"prompt_predicted_mean", "prompt_predicted_std", "prompt"} <= columns:
        stats["difficulty"] = _difficulty(table.filter(ok))
    return stats


def _steps_spent(table: pa.Table, columns: set) -> int:
    """Denoising steps the delivered images cost: their steps_spent, or for rows without it their steps."""
    steps = table["steps"]
    if "steps_spent" in columns:
        steps = pc.coalesce(table["steps_spent"], steps)
    return int(pc.sum(steps).as_py() or 0)


def _difficulty(table: pa.Table) -> dict | None:
    """Per prompt (its first row): the predicted mean and spread over its N candidates."""
    seen, prompts = set(), []
    for prompt_id, prompt, mean, std in zip(*(table[c].to_pylist() for c in
                                              ("prompt_id", "prompt", "prompt_predicted_mean", "prompt_predicted_std"))):
        if prompt_id in seen or mean is None or std is None or mean != mean:
            continue
        seen.add(prompt_id)
        prompts.append({"prompt_id": prompt_id, "prompt": prompt, "predicted_mean": round(mean, 4),
                        "predicted_spread": round(std, 4)})
    if not prompts:
        return None
    return {
        "mean": sketch(np.array([p["predicted_mean"] for p in prompts])),
        "spread": sketch(np.array([p["predicted_spread"] for p in prompts])),
        "hardest": heapq.nsmallest(LISTED, prompts, key=lambda p: p["predicted_mean"]),
        "most_seed_sensitive": heapq.nlargest(LISTED, prompts, key=lambda p: p["predicted_spread"]),
    }


def merge_stats(many: list[dict]) -> dict:
    """The fold of shard statistics; exact for counts and lists, a close approximation for quantiles."""
    total: dict = {"rows": 0, "by_status": Counter(), "prompts": 0, "images": 0, "failures": 0,
                   "quarantine_reasons": Counter(), "failure_reasons": Counter()}
    scores, means, spreads, hardest, sensitive = [], [], [], [], []
    for stats in many:
        for name in ("rows", "prompts", "images", "failures"):
            total[name] += stats.get(name, 0)
        for name in ("by_status", "quarantine_reasons", "failure_reasons"):
            total[name].update(stats.get(name) or {})
        scores.append(stats.get("score"))
        difficulty = stats.get("difficulty")
        if difficulty:
            means.append(difficulty["mean"])
            spreads.append(difficulty["spread"])
            hardest += difficulty["hardest"]
            sensitive += difficulty["most_seed_sensitive"]
    for name in ("by_status", "quarantine_reasons", "failure_reasons"):
        total[name] = dict(total[name].most_common())
    outdated = [source for stats in many for source in stats.get("outdated_sources") or []]
    total["outdated"] = {"lines": len(outdated), "sources": sorted(outdated)[:LISTED]}
    total["score"] = merge_sketches(scores)
    total["difficulty"] = None if not means else {
        "mean": merge_sketches(means), "spread": merge_sketches(spreads),
        "hardest": heapq.nsmallest(LISTED, hardest, key=lambda p: p["predicted_mean"]),
        "most_seed_sensitive": heapq.nlargest(LISTED, sensitive, key=lambda p: p["predicted_spread"]),
    }
    return total


def prompt_difficulty(stats: dict) -> dict | None:
    """The summary's view of the predictor's per-prompt feedback: quantiles and the prompts worth a look."""
    difficulty = stats.get("difficulty")
    if not difficulty:
        return None
    quantiles = (0.1, 0.5, 0.9)
    return {
        "prompts": difficulty["mean"]["n"],
        "predicted_mean_quantiles": {str(q): quantile(difficulty["mean"], q) for q in quantiles},
        "predicted_spread_quantiles": {str(q): quantile(difficulty["spread"], q) for q in quantiles},
        "hardest_prompts": difficulty["hardest"],
        "most_seed_sensitive_prompts": difficulty["most_seed_sensitive"],
    }
