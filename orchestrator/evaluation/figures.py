"""What evaluate measures: the predictor's picks against the rated candidates (gain, rank correlation, NDCG), a
prompt-swap control, the preview cost curve, and the renders the contact sheet shows."""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from orchestrator.run.config import ConfigError

logger = logging.getLogger("seedsift.evaluate")

EXTRA_NDCG_K = 3  # NDCG is reported at --k and at this depth
RENDER_BATCH = 8  # contact-sheet images per pipeline call
PREVIEW_BATCH = 16  # previewed candidates per denoiser call in the cost curve


def predict(predictor, seeds: list[np.ndarray], embeddings: list[dict], latent_shape: tuple) -> list[np.ndarray]:
    """Predicted scores of every prompt's candidates, with the noise re-derived from each seed as the scorer does."""
    from actors.models.seeds import batch_noise

    return [predictor.score_candidates(batch_noise([int(s) for s in prompt_seeds], latent_shape), embeds)
            for prompt_seeds, embeds in zip(seeds, embeddings)]


def swap_partner(count: int) -> list[int]:
    """For each prompt, the prompt whose embedding scores its candidates in the prompt-swap control: half the
    list away, so no prompt keeps its own and neighbours (often of one template or category) are not paired."""
    return [(i + count // 2) % count for i in range(count)]


def prompt_swap_control(predictor, groups, embeddings: list[dict], latent_shape: tuple, predicted: list[np.ndarray],
                        figures: dict, k: int) -> dict | None:
    """Every prompt's candidates scored with another prompt's embedding: how much of the gain survives shows how
    much the predictor's pick depends on the text (1.0: none; 0: all of it)."""
    count = len(embeddings)
    if count < 2:
        return None
    partner = swap_partner(count)
    swapped = predict(predictor, groups.seeds, [embeddings[j] for j in partner], latent_shape)
    control = measure(swapped, groups.scores, k)
    own_gain = figures["top1_gain_std_units"]
    kept = control["top1_gain_std_units"] / own_gain if own_gain and np.isfinite(own_gain) and own_gain > 0 else None
    same_pick = float(np.mean([int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(predicted, swapped)]))
    return {
        "spearman_per_prompt_mean": control["spearman_per_prompt_mean"],
        "top1_gain_std_units": control["top1_gain_std_units"],
        "predictor_top1_mean": control["predictor_top1_mean"],
        "gain_kept": kept,
        "same_top1_share": same_pick,
        "note": "each prompt's candidates scored with the embedding of the prompt half the list away",
    }


def preview_scores(model_path: str, identity: dict, prompts: list[str], embeddings: list[dict],
                   seeds: list[list[int]], at_steps: list[int]) -> list[dict[int, np.ndarray]]:
    """Each prompt's candidates (seeds[i]) previewed as the preview policy does: one denoising per candidate, its
    predicted final image decoded and rated after each step count in `at_steps`. Returns [{step: scores}]."""
    from actors.models import diffusion, families
    from actors.models.seeds import batch_noise
    from actors.raters.specs import make_rater
    from actors.stages.generator import denoise_with_previews

    if identity.get("solver_schedule") is not None:
        raise ConfigError(f"--previews: the dataset was rendered with a searched solver schedule "
                          f"({identity['scheduler']}), which cannot pause a denoising and continue the best preview; "
                          "pass --previews none")
    scheduler = families.scheduler_from_label(model_path, identity["scheduler"])
    try:
        families.check_resumable_solver(model_path, scheduler)
    except ValueError as exc:
        raise ConfigError(f"--previews: the dataset's solver: {exc}; or pass --previews none") from exc
    renderer = diffusion.load_renderer(model_path, scheduler, attention=identity.get("attention", "full"))
    rater = make_rater(identity["rater"])
    steps, guidance = int(identity["steps"]), float(identity["guidance"])
    height, width = int(identity["height"]), int(identity["width"])
    shape = families.latent_shape(model_path, height, width)
    owner = [i for i, prompt_seeds in enumerate(seeds) for _ in prompt_seeds]
    flat = [int(seed) for prompt_seeds in seeds for seed in prompt_seeds]
    results = [{step: [] for step in at_steps} for _ in seeds]
    for start in range(0, len(flat), PREVIEW_BATCH):
        rows, chunk = owner[start:start + PREVIEW_BATCH], flat[start:start + PREVIEW_BATCH]
        embeds = {key: np.stack([embeddings[i][key] for i in rows]) for key in embeddings[0]}
        conditioning = renderer.conditioning(embeds, guidance, height, width)
        state = renderer.start(batch_noise(chunk, shape), steps, chunk)
        texts = [prompts[i] for i in rows]
        _, scores = denoise_with_previews(renderer, state, conditioning, at_steps,
                                          lambda images, texts=texts: rater.score(images, texts))
        for step, values in scores.items():
            for row, value in zip(rows, values):
                results[row][step].append(float(value))
    return [{step: np.asarray(values) for step, values in result.items()} for result in results]


def cost_curve(model_path: str, identity: dict, groups, embeddings: list[dict], predicted: list[np.ndarray],
               previews: list[tuple[int, int]]) -> dict:
    """Mean rated score against denoising steps per delivered image, for random, the predictor's top-1,
    best-of-n and the preview policy at each (M, T). A preview's final image is a normal render of its seed
    (tested), so its score is the dataset's rating of that candidate; only the previews are rendered here."""
    steps, count = int(identity["steps"]), len(groups.seeds[0])
    curve = measure(predicted, groups.scores, 1)["gain_curve"]
    points = [{"policy": "random", "steps": steps, "mean_score": curve[-1]["random"]},
              {"policy": "predictor", "steps": steps, "mean_score": curve[-1]["predictor"]}]
    points += [{"policy": "best_of_n", "n": point["n"], "steps": point["n"] * steps, "mean_score": point["oracle"]}
               for point in curve]
    if previews:
        from actors.stages.generator import preview_steps_spent

        most = max(m for m, _ in previews)
        ranked = [np.argsort(-p, kind="stable")[:most] for p in predicted]  # the predictor's best first
        started = time.time()
        scores = preview_scores(model_path, identity, groups.prompts, embeddings,
                                [groups.seeds[i][order] for i, order in enumerate(ranked)],
                                sorted({t for _, t in previews}))
        for previewed, preview_steps in previews:
            chosen = [order[int(np.argmax(s[preview_steps][:previewed]))] for order, s in zip(ranked, scores)]
            agree = np.mean([int(c) == int(np.argmax(a)) for c, a in zip(chosen, groups.scores)])
            points.append({"policy": "preview", "m": previewed, "t": preview_steps,
                           "steps": preview_steps_spent(previewed, preview_steps, steps),
                           "mean_score": float(np.mean([a[c] for c, a in zip(chosen, groups.scores)])),
                           "p_pick_best": float(agree)})
        logger.info("previews for the cost curve: %.1f s", time.time() - started)
    best = curve[-1]["oracle"]
    for point in points:
        point["share_of_best_of_n_steps"] = round(point["steps"] / (count * steps), 4)
        point["reaches_best_of_n"] = bool(point["mean_score"] >= best - 1e-12)
    return {"best_of_n": count, "best_of_n_mean": best, "best_of_n_steps": count * steps, "points": points}


def curve_sizes(count: int) -> list[int]:
    """1, 2, 4, ... up to N, and N itself when it is not a power of two."""
    sizes = [2**i for i in range(int(math.log2(count)) + 1)]
    return sizes if sizes[-1] == count else sizes + [count]


def measure(predicted: list[np.ndarray], actual: list[np.ndarray], k: int) -> dict:
    """Every headline figure of the report, from per-prompt predicted and rated scores (candidate_index order)."""
    from actors.predictor import metrics

    groups = list(zip(predicted, actual))
    count = len(actual[0])
    correlations = metrics.per_prompt_spearman(groups)
    gains = [metrics.top1_gain(p, a) for p, a in groups]
    std_units = np.array([g["gain_std_units"] for g in gains])
    curve = metrics.gain_curve(groups, curve_sizes(count))
    target = curve[-1]["predictor"]
    renders = metrics.renders_for_equal_quality(curve, target)
    if renders is None:
        note = (f"best-of-n does not reach the predictor's top-1-of-{count} mean score within {count} renders: "
                f"compute saved is more than {count}x")
    else:
        note = (f"best-of-n needs {renders:.2f} renders per prompt to match the predictor's top-1 of {count}, "
                f"which renders 1: {renders:.2f}x the compute")
    return {
        "spearman_global": metrics.spearman(np.concatenate(predicted), np.concatenate(actual)),
        "spearman_per_prompt_mean": _nanstat(np.nanmean, correlations),
        "spearman_per_prompt_median": _nanstat(np.nanmedian, correlations),
        "spearman_per_prompt_defined": int(np.sum(~np.isnan(correlations))),
        "ndcg": {str(depth): _nanstat(np.nanmean, [metrics.ndcg_at_k(p, a, depth) for p, a in groups])
                 for depth in sorted({k, EXTRA_NDCG_K})},
        "top1_gain": float(np.mean([g["gain"] for g in gains])),
        "top1_gain_std_units": _nanstat(np.nanmean, std_units),
        "top1_gain_std_units_prompts": int(np.sum(~np.isnan(std_units))),
        "p_pick_best": float(np.mean([g["picked_best"] for g in gains])),
        "p_pick_best_chance": float(np.mean([g["chance_best"] for g in gains])),
        "gain_curve": curve,
        "predictor_top1_mean": target,
        "random_mean": curve[-1]["random"],
        "oracle_best_of_n_mean": curve[-1]["oracle"],
        "renders_for_equal_quality": renders,
        "compute_saved": renders,  # renders best-of-n needs for equal quality, per render the predictor needs (1)
        "compute_saved_note": note,
    }


def per_prompt_rows(groups, predicted: list[np.ndarray], k: int) -> list[dict]:
    from actors.predictor import metrics

    rows = []
    for pid, prompt, p, a in zip(groups.prompt_ids, groups.prompts, predicted, groups.scores):
        gain = metrics.top1_gain(p, a)
        rows.append({"prompt_id": pid, "prompt": prompt, "spearman": metrics.spearman(p, a),
                     f"ndcg@{k}": metrics.ndcg_at_k(p, a, k), "pick": gain["pick"],
                     "pick_score": float(a[gain["pick"]]),
                     "mean_score": float(a.mean()), "best_score": float(a.max()),
                     "gain_std_units": gain["gain_std_units"], "picked_best": gain["picked_best"]})
    return rows


def _nanstat(function, values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(function(values)) if np.any(~np.isnan(values)) else float("nan")


def json_safe(value):
    """NaN and infinities become null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def render_candidates(model_path: str, identity: dict, text_adapter, prompts: list[str],
                      seeds: list[list[int]]) -> tuple[list[np.ndarray], float]:
    """Images of the given seeds of each prompt, in order, rendered as the generator stage does; and the mean
    seconds per image spent in the pipeline call (loading excluded)."""
    from actors.models import diffusion, families
    from actors.models.seeds import batch_noise

    schedule = identity.get("solver_schedule")  # a searched schedule's rows: rendered with it (run.json holds it)
    scheduler = "default" if schedule is not None else families.scheduler_from_label(model_path, identity["scheduler"])
    renderer = diffusion.load_renderer(model_path, scheduler, schedule, identity.get("attention", "full"))
    shape = families.latent_shape(model_path, identity["height"], identity["width"])
    embeds = text_adapter.encode(prompts, identity["guidance"])
    embeds.pop("truncated")
    owner = [row for row, prompt_seeds in enumerate(seeds) for _ in prompt_seeds]
    flat = [seed for prompt_seeds in seeds for seed in prompt_seeds]
    images: list[np.ndarray] = []
    started = time.time()
    for start in range(0, len(flat), RENDER_BATCH):
        rows = owner[start:start + RENDER_BATCH]
        chunk = flat[start:start + RENDER_BATCH]
        batch = renderer.render({key: values[rows] for key, values in embeds.items()},
                                batch_noise(chunk, shape), steps=int(identity["steps"]),
                                guidance_scale=float(identity["guidance"]), height=int(identity["height"]),
                                width=int(identity["width"]), seeds=chunk)
        images += list(batch)
    return images, (time.time() - started) / max(1, len(images))
