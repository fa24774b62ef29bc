"""The evaluate job: scores a collected set's candidates with a predictor and reports how well it picks seeds.

Run as `seedsift evaluate --dataset COLLECT_OUT --predictor FOLDER --out REPORT_DIR`; writes evaluation.json,
report.html and contact_sheet.png. Reads what collect and train wrote; nothing later reads what it writes.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import logging
import math
import os
import sys
import time

import numpy as np

from jobs.common import add_storage_options, run_job
from orchestrator.output.storage import Output
from orchestrator.run.config import ConfigError

logger = logging.getLogger("seedsift.evaluate")

REPORT_FILE = "evaluation.json"
HTML_FILE = "report.html"
CONTACT_SHEET_FILE = "contact_sheet.png"
EXTRA_NDCG_K = 3  # NDCG is reported at --k and at this depth
# Pipeline settings a predictor records and a dataset must share: its images come from exactly that pipeline.
CHECKED_SETTINGS = ("model", "width", "height")
# Settings that may differ: the predictor still scores the same noise, but its ranking may weaken; measuring how
# much is what evaluating on such a set is for, so these are warnings, recorded in evaluation.json.
WARNED_SETTINGS = ("scheduler", "steps", "guidance")
SCATTER_MAX_POINTS = 4000  # the scatter plot draws a fixed random subset beyond this, to keep the page small
SCORER_COST_NOTE = ("compute_saved counts renders: the predictor renders 1 image per prompt, best-of-n renders n. "
                    "The predictor also scores N noises per prompt with a small network (scoring_seconds_per_prompt, "
                    "on the CPU); scoring_cost_in_renders puts it in units of one render on this machine, which "
                    "for a real pipeline on a GPU is small next to a render's cost")

# Contact sheet layout, in pixels: one row per prompt, candidate 0 (random policy) left, the predictor's pick right.
TILE = 256
MARGIN = 8
LINE = 16
FONT_SIZE = 12
RENDER_BATCH = 8  # contact-sheet images per pipeline call
PREVIEW_BATCH = 16  # previewed candidates per denoiser call in the cost curve
DEFAULT_PREVIEWS = "2x2,4x2,4x4,8x2,8x4"  # (M candidates)x(T steps) settings the cost curve measures


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="seedsift evaluate", description=__doc__.splitlines()[0])
    add = result.add_argument
    add("--dataset", required=True, help="a collect job's --out (or its dataset.parquet), local or s3://")
    add("--predictor", required=True, help="predictor folder (a train job's --out), local or s3://")
    add("--out", required=True, help="report folder or s3:// prefix")
    add("--k", type=int, default=1, help=f"NDCG depth (NDCG@{EXTRA_NDCG_K} is reported too)")
    add("--contact-prompts", type=int, default=4, help="held-out prompts rendered in the contact sheet (0: none)")
    add("--split", choices=("auto", "test", "all"), default="auto",
        help="test: only the predictor's held-out prompts; all: every prompt; auto (default): test on the dataset "
             "the predictor was trained on, all on any other")
    add("--previews", default="auto",
        help="preview settings for the cost curve, MxT (the predictor's best M candidates, T steps each), comma "
             f"separated; 'none' skips the curve's preview points; auto (default): those of {DEFAULT_PREVIEWS} "
             "that fit the dataset's N and steps")
    add_storage_options(result)
    return result


def parse_previews(text: str, candidates: int, steps: int) -> list[tuple[int, int]]:
    """--previews as (M, T) pairs, each checked against the dataset's N and steps."""
    if text.strip().lower() in ("", "none"):
        return []
    automatic = text.strip().lower() == "auto"
    settings = []
    for item in (DEFAULT_PREVIEWS if automatic else text).split(","):
        try:
            previewed, preview_steps = (int(part) for part in item.strip().lower().split("x"))
        except ValueError:
            raise ConfigError(f"--previews {item.strip()!r}: expected MxT, such as 4x5 (M candidates, T steps)") from None
        if not 1 <= previewed <= candidates or not 1 <= preview_steps < steps:
            if automatic:
                continue
            raise ConfigError(f"--previews {item.strip()}: M must be 1 to N={candidates} and T 1 to {steps - 1} "
                              f"(the dataset's steps are {steps})")
        settings.append((previewed, preview_steps))
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        evaluation = evaluate(args)
        summary = {key: value for key, value in evaluation.items() if key != "per_prompt"}
        print(json.dumps(summary, indent=2))
        return 0

    return run_job(body)


# ----------------------------------------------------------------------------------------------- the job


def evaluate(args: argparse.Namespace) -> dict:
    """The whole job: check inputs, predict, measure, render the contact sheet, write the report; returns the JSON."""
    from actors.models.embedded import resolve_model
    from actors.predictor.model import predictor_from_files, read_config
    from actors.predictor.training import group_by_prompt
    from orchestrator.output.dataset import dataset_identity, read_dataset
    from orchestrator.run.predictor_files import as_config_error, read_predictor_files

    started = time.time()
    storage_options = args.storage_options
    if args.k < 1:
        raise ConfigError(f"--k must be at least 1 (got {args.k})")
    if args.contact_prompts < 0:
        raise ConfigError(f"--contact-prompts must be 0 or more (got {args.contact_prompts})")
    output = Output(args.out, storage_options)
    output.check_writable()

    table = read_dataset(args.dataset)
    identity = dataset_identity(table)
    # Predictor problems raise a ConfigError that names args.predictor.
    predictor_files = read_predictor_files(args.predictor, "", storage_options)
    with as_config_error():
        config = read_config(predictor_files, args.predictor)
    warnings = check_same_pipeline(identity, config, args.dataset, args.predictor)
    groups = group_by_prompt(table)
    split, split_reason = choose_split(args.split, config, table)
    total_prompts = len(groups.prompt_ids)
    groups, split_counts = select_prompts(groups, config, split, args.predictor)
    if len(groups.prompt_ids) < total_prompts:
        logger.warning("evaluating %d of the dataset's %d prompts (%s); pass --split all for every prompt",
                       len(groups.prompt_ids), total_prompts, split_reason)
    groups, incomplete = complete_prompts(groups)
    model_path = resolve_model(identity["model"])
    with as_config_error():
        predictor = predictor_from_files(predictor_files, model_path, identity["height"], identity["width"],
                                         source=args.predictor)

    from actors.models import diffusion, families

    latent_shape = families.latent_shape(model_path, identity["height"], identity["width"])
    text_adapter = diffusion.load_adapter(model_path, "text")  # CPU float32, exactly as the scorer stage embeds
    embeddings = text_adapter.embed_each(groups.prompts, identity["guidance"])
    predict(predictor, groups.seeds[:1], embeddings[:1], latent_shape)  # warm-up: first calls pay one-off costs
    scoring_started = time.time()
    predicted = predict(predictor, groups.seeds, embeddings, latent_shape)
    scoring_seconds = (time.time() - scoring_started) / len(predicted)

    figures = measure(predicted, groups.scores, args.k)
    figures["scoring_seconds_per_prompt"] = round(scoring_seconds, 5)
    figures["prompt_swap"] = prompt_swap_control(predictor, groups, embeddings, latent_shape, predicted, figures,
                                                 args.k)
    previews = parse_previews(args.previews, len(groups.seeds[0]), int(identity["steps"]))
    figures["cost_curve"] = cost_curve(model_path, identity, groups, embeddings, predicted, previews)
    contact = None
    if args.contact_prompts:
        chosen = list(range(min(args.contact_prompts, len(groups.prompt_ids))))
        sheet, contact = contact_sheet(model_path, identity, text_adapter, groups, predicted, chosen)
        output.write_bytes(CONTACT_SHEET_FILE, sheet)
        figures["render_seconds_per_image"] = contact.pop("render_seconds_per_image")
        figures["scoring_cost_in_renders"] = round(scoring_seconds / max(figures["render_seconds_per_image"], 1e-9), 4)

    evaluation = {
        "dataset": args.dataset,
        "predictor": args.predictor,
        "split": split,
        "split_reason": split_reason,
        "warnings": warnings,
        **{key: identity[key] for key in ("model", "scheduler", "rater", "steps", "guidance", "width", "height")},
        "prompts": len(groups.prompt_ids),
        "candidates": len(groups.seeds[0]),
        "rows": int(sum(len(s) for s in groups.seeds)),
        "prompts_by_split": split_counts,
        "prompts_incomplete": incomplete,
        **figures,
        "compute_note": SCORER_COST_NOTE,
        "contact_sheet": contact,
        "predictor_trained_metrics": config.metrics,
        "wall_seconds": round(time.time() - started, 1),
        "per_prompt": per_prompt_rows(groups, predicted, args.k),
    }
    evaluation = _json_safe(evaluation)
    output.write_bytes(HTML_FILE, report_html(evaluation, groups.scores, predicted).encode("utf-8"))
    output.write_json(REPORT_FILE, evaluation)  # last: its presence means the report is complete
    return evaluation


def _same_setting(key: str, recorded, collected) -> bool:
    if key == "guidance":
        return math.isclose(float(recorded), float(collected), rel_tol=1e-9, abs_tol=1e-9)
    if key == "model" and recorded != collected and "://" not in f"{recorded}{collected}":
        # Two spellings of one local folder are one model; an embedded name or hub id must match exactly.
        folders = [os.path.expanduser(str(recorded)), os.path.expanduser(str(collected))]
        return all(os.path.isdir(folder) for folder in folders) and os.path.samefile(*folders)
    return str(recorded) == str(collected)


def check_same_pipeline(identity: dict, config, dataset: str, predictor: str) -> list[str]:
    """Refuse a dataset whose images come from another model, size or rater than the predictor was trained on;
    return warnings for other steps, guidance or scheduler (evaluated anyway: that is how to measure them)."""
    problems, unchecked, warnings = [], [], []
    recorded = dict(config.pipeline)
    recorded["rater"] = config.rater or None
    for key in CHECKED_SETTINGS + ("rater",) + WARNED_SETTINGS:
        if recorded.get(key) is None:
            unchecked.append(key)
        elif not _same_setting(key, recorded[key], identity[key]):
            message = f"{key}: predictor {recorded[key]!r}, dataset {identity[key]!r}"
            (warnings if key in WARNED_SETTINGS else problems).append(message)
    for warning in warnings:
        logger.warning("the dataset was collected at other settings than the predictor was trained at (%s): its "
                       "ranking may be weaker; these figures measure how much", warning)
    if problems:
        raise ConfigError(
            f"--dataset {dataset} was not collected with the pipeline --predictor {predictor} was trained for ("
            + "; ".join(problems) + "). Its scores rate other images, so evaluating this predictor on them measures "
            "nothing it will be used for. Collect a dataset with the predictor's settings, or pass a predictor "
            "trained on this dataset's.")
    if unchecked:
        logger.warning("predictor %s does not record %s; cannot check that the dataset matches them",
                       predictor, ", ".join(unchecked))
    return [f"settings differ from the predictor's training ({w})" for w in warnings]


def choose_split(split: str, config, table) -> tuple[str, str]:
    """`auto`: the held-out split on the predictor's own training set, every prompt on any other; with why."""
    from orchestrator.output.dataset import dataset_digest

    if split != "auto":
        return split, f"--split {split}"
    recorded = (config.training_set or {}).get("digest")
    if recorded and recorded == dataset_digest(table):
        return "test", "the dataset is the predictor's training set: only its held-out test prompts"
    if recorded:
        return "all", "the dataset is not the predictor's training set: every prompt"
    return "test", "the predictor records no training set (trained by an older seedsift): its test split"


def select_prompts(groups, config, split: str, predictor: str):
    """The prompts to evaluate: the predictor's held-out test split, or all; plus the dataset's count per split."""
    from actors.predictor.model import split_of

    recorded = config.split or {}
    counts = None
    labels = None
    if {"salt", "train", "val"} <= set(recorded):
        labels = [split_of(pid, str(recorded["salt"]), float(recorded["train"]), float(recorded["val"]))
                  for pid in groups.prompt_ids]
        counts = {name: labels.count(name) for name in ("train", "val", "test")}
    if split == "all":
        if counts and counts["train"] + counts["val"]:
            logger.warning("--split all: %d of the %d prompts fall in the predictor's train or validation split; "
                           "if its training set had them, their figures are optimistic",
                           counts["train"] + counts["val"], len(labels))
        return groups, counts
    if labels is None:
        raise ConfigError(f"--predictor {predictor} records no train/val/test split (salt, train, val), so its "
                          "held-out prompts are unknown; pass --split all for a dataset collected apart from training")
    test = [i for i, label in enumerate(labels) if label == "test"]
    if not test:
        raise ConfigError(
            f"none of the dataset's {len(labels)} prompts is in the predictor's held-out test split (test fraction "
            f"{1 - float(recorded['train']) - float(recorded['val']):.2f}); collect more prompts, or pass --split all "
            "for a dataset collected apart from training")
    return groups.subset(test), counts


def complete_prompts(groups):
    """Prompts that have every candidate 0..N-1 rated (N the most any prompt has); the gain curve needs prefixes."""
    if not groups.prompt_ids:
        raise ConfigError("the dataset has no prompt with at least 2 rated candidates; collect with --candidates 2+")
    count = max(len(s) for s in groups.seeds)
    keep = [i for i, index in enumerate(groups.candidate_index) if np.array_equal(index, np.arange(count))]
    dropped = len(groups.prompt_ids) - len(keep)
    if not keep:
        raise ConfigError(f"no prompt has all {count} candidates rated (failed renders); rerun the collect job, "
                          "which renders only what is missing")
    if dropped:
        logger.warning("%d prompts miss some of their %d candidates (failed renders) and are left out", dropped, count)
    return groups.subset(keep), dropped


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


# ------------------------------------------------------------------------------------------------ figures


def preview_scores(model_path: str, identity: dict, prompts: list[str], embeddings: list[dict],
                   seeds: list[list[int]], at_steps: list[int]) -> list[dict[int, np.ndarray]]:
    """Each prompt's candidates (seeds[i]) previewed as the preview policy does: one denoising per candidate, its
    predicted final image decoded and rated after each step count in `at_steps`. Returns [{step: scores}]."""
    from actors.models import diffusion, families
    from actors.models.seeds import batch_noise
    from actors.raters.specs import make_rater
    from actors.stages.generator import denoise_with_previews, device_and_dtype

    scheduler = families.scheduler_from_label(model_path, identity["scheduler"])
    try:
        families.check_resumable_solver(model_path, scheduler)
    except ValueError as exc:
        raise ConfigError(f"--previews: the dataset's solver: {exc}; or pass --previews none") from exc
    device, dtype = device_and_dtype()
    renderer = diffusion.load_adapter(model_path, "render", device=device, dtype=dtype, scheduler=scheduler)
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


def _json_safe(value):
    """NaN and infinities become null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------------------- contact sheet


def contact_sheet_size(rows: int) -> tuple[int, int]:
    """(width, height) of a contact sheet with `rows` prompts."""
    return 2 * TILE + 3 * MARGIN, MARGIN + rows * (LINE + TILE + 3 * LINE + MARGIN)


def contact_sheet(model_path: str, identity: dict, text_adapter, groups, predicted: list[np.ndarray],
                  chosen: list[int]) -> tuple[bytes, dict]:
    """PNG of the first held-out prompts (by prompt id, not picked by result): candidate 0, which the random
    policy renders, beside the predictor's top-1, each labelled with its rated score from the dataset."""
    from PIL import Image, ImageDraw, ImageOps

    from actors.predictor.selection import keep_top_k
    from jobs.pages.fonts import text_font

    picks = [keep_top_k(predicted[i], 1)[0] for i in chosen]
    pairs = [[int(groups.seeds[i][0]), int(groups.seeds[i][pick])] for i, pick in zip(chosen, picks)]
    images, render_seconds = render_candidates(model_path, identity, text_adapter, [groups.prompts[i] for i in chosen],
                                               pairs)
    width, height = contact_sheet_size(len(chosen))
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = text_font(FONT_SIZE)
    entries = []
    for row, (i, pick) in enumerate(zip(chosen, picks)):
        top = MARGIN + row * (LINE + TILE + 3 * LINE + MARGIN)
        title = f"{groups.prompt_ids[i]}: {groups.prompts[i]}"
        draw.text((MARGIN, top), _fit(draw, title, font, width - 2 * MARGIN), fill="black", font=font)
        scores, guesses = groups.scores[i], predicted[i]
        labels = [("random policy: candidate 0", f"score {scores[0]:.4g} (predicted {guesses[0]:.4g})"),
                  (f"predictor: candidate {pick}" + (" (= candidate 0)" if pick == 0 else ""),
                   f"score {scores[pick]:.4g} (predicted {guesses[pick]:.4g})")]
        for column, (line1, line2) in enumerate(labels):
            left = MARGIN + column * (TILE + MARGIN)
            picture = Image.fromarray(images[2 * row + column])
            resample = Image.NEAREST if max(picture.size) < TILE else Image.LANCZOS
            picture = ImageOps.contain(picture, (TILE, TILE), method=resample)
            sheet.paste(picture, (left + (TILE - picture.width) // 2, top + LINE + (TILE - picture.height) // 2))
            draw.text((left, top + LINE + TILE + 2), _fit(draw, line1, font, TILE), fill="black", font=font)
            draw.text((left, top + 2 * LINE + TILE), _fit(draw, line2, font, TILE), fill="black", font=font)
        lower = bool(scores[pick] < scores[0])
        if lower:  # said plainly: selection is a bet, and this one lost
            draw.text((MARGIN, top + 3 * LINE + TILE), "the predictor's pick rated lower than candidate 0",
                      fill="#b00000", font=font)
        entries.append({"prompt_id": groups.prompt_ids[i], "prompt": groups.prompts[i], "predictor_pick": pick,
                        "pick_score": float(scores[pick]), "candidate0_score": float(scores[0]),
                        "pick_rated_lower": lower})
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue(), {"file": CONTACT_SHEET_FILE, "rows": entries,
                               "render_seconds_per_image": round(render_seconds, 4)}


def render_candidates(model_path: str, identity: dict, text_adapter, prompts: list[str],
                      seeds: list[list[int]]) -> tuple[list[np.ndarray], float]:
    """Images of the given seeds of each prompt, in order, rendered as the generator stage does; and the mean
    seconds per image spent in the pipeline call (loading excluded)."""
    from actors.models import diffusion, families
    from actors.models.seeds import batch_noise
    from actors.stages.generator import device_and_dtype

    device, dtype = device_and_dtype()
    renderer = diffusion.load_adapter(model_path, "render", device=device, dtype=dtype,
                                      scheduler=families.scheduler_from_label(model_path, identity["scheduler"]))
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


def _fit(draw, text: str, font, width: int) -> str:
    """The text, cut with "..." so it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


# ------------------------------------------------------------------------------------------------ report


def report_html(evaluation: dict, actual: list[np.ndarray], predicted: list[np.ndarray]) -> str:
    """A self-contained page: the figures, a predicted-vs-rated scatter, the gain curve and the contact sheet."""

    def number(value, digits: int = 3) -> str:
        return "n/a" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    e = evaluation
    count = e["candidates"]
    ndcg = "; ".join(f"@{depth}: {number(value)}" for depth, value in e["ndcg"].items())
    rows = [
        ("prompts evaluated", f"{e['prompts']} ({e['split']} split; {e['prompts_incomplete']} incomplete left out)"),
        ("candidates per prompt (N)", count),
        ("model / scheduler", f"{e['model']} / {e['scheduler']}"),
        ("steps, guidance, size", f"{e['steps']}, {e['guidance']}, {e['width']}x{e['height']}"),
        ("rater", e["rater"]),
        ("Spearman, all rows", number(e["spearman_global"])),
        ("Spearman per prompt: mean / median", f"{number(e['spearman_per_prompt_mean'])} / "
                                                f"{number(e['spearman_per_prompt_median'])}"),
        ("NDCG (relevance: rated score min-max scaled per prompt)", ndcg),
        (f"top-1-of-{count} gain over a random seed", f"{number(e['top1_gain'], 4)} rater units; "
                                                      f"{number(e['top1_gain_std_units'])} per-prompt std"),
        ("P(pick the true best)", f"{number(e['p_pick_best'])} (chance {number(e['p_pick_best_chance'])})"),
        (f"mean score: predictor top-1 of {count} / random / best of {count}",
         f"{number(e['predictor_top1_mean'], 4)} / {number(e['random_mean'], 4)} / "
         f"{number(e['oracle_best_of_n_mean'], 4)}"),
        ("compute saved", e["compute_saved_note"]),
        ("prompt-swap control (each prompt scored with another prompt's embedding)",
         "not measured (one prompt)" if not e.get("prompt_swap") else
         f"per-prompt Spearman {number(e['prompt_swap']['spearman_per_prompt_mean'])}; top-1 gain "
         f"{number(e['prompt_swap']['top1_gain_std_units'])} per-prompt std, "
         f"{number(e['prompt_swap']['gain_kept'])} of the gain kept; same pick on "
         f"{number(e['prompt_swap']['same_top1_share'])} of prompts"),
        ("scorer cost", f"{number(e['scoring_seconds_per_prompt'], 4)} s per prompt for N noises; one render "
                        f"{number(e.get('render_seconds_per_image'), 3)} s on this machine "
                        f"(scoring = {number(e.get('scoring_cost_in_renders'), 3)} renders)"),
    ]
    table = "\n".join(f"<tr><th>{html.escape(str(name))}</th><td>{html.escape(str(value))}</td></tr>"
                      for name, value in rows)
    contact = ""
    if e.get("contact_sheet"):
        contact = (f"<h2>Contact sheet</h2><p>The first {len(e['contact_sheet']['rows'])} evaluated prompts by id "
                   "(not chosen by result): left, candidate 0, what the random policy renders; right, the "
                   f"predictor's pick of {count}. Scores are the dataset's ratings.</p>"
                   f'<img src="{CONTACT_SHEET_FILE}" alt="contact sheet">')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>seedsift evaluation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ text-align: left; padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; }}
th {{ font-weight: 600; }} svg {{ display: block; margin: 1em 0; }} .note {{ color: #555; }}
</style></head><body>
<h1>seedsift evaluation</h1>
<p class="note">Predictor {html.escape(str(e['predictor']))} on {html.escape(str(e['dataset']))}.</p>
<table>
{table}
</table>
<h2>Predicted vs rated</h2>
<p class="note">Left: raw scores, every row. Right: both centred on their prompt's mean, which removes how good a
prompt is overall and shows what selection uses: the order of one prompt's candidates.</p>
{scatter_svg(actual, predicted)}
<h2>Mean score against candidates seen (n)</h2>
<p class="note">From the first n candidates of each prompt (what a run with --candidates n sees). Predictor: its
top-1 of n, 1 render. Random: one random seed, 1 render. Oracle: render all n, rate, keep the best: n renders.</p>
{curve_svg(e['gain_curve'])}
<h2>Mean score against denoising steps per delivered image</h2>
<p class="note">What each policy spends for one image. Random and the predictor's top-1 render once (the schedule's
steps); best of n renders n seeds in full; the preview policy runs the predictor's best M candidates for T steps,
rates their predicted final images and continues only the best: M&times;T + (steps &minus; T).</p>
{cost_svg(e['cost_curve'])}
{cost_table(e['cost_curve'])}
{contact}
</body></html>
"""


def cost_table(cost: dict) -> str:
    def label(point: dict) -> str:
        return {"random": "random seed", "predictor": "predictor top-1",
                "best_of_n": f"best of {point.get('n')}",
                "preview": f"preview {point.get('m')}x{point.get('t')}"}[point["policy"]]

    rows = "".join(f"<tr><td>{html.escape(label(p))}</td><td>{p['steps']}</td>"
                   f"<td>{p['share_of_best_of_n_steps']:.3f}</td><td>{p['mean_score']:.4f}</td></tr>"
                   for p in sorted(cost["points"], key=lambda p: p["steps"]))
    return ("<table><tr><th>policy</th><th>steps per image</th>"
            f"<th>share of best-of-{cost['best_of_n']} steps</th><th>mean rated score</th></tr>{rows}</table>")


def cost_svg(cost: dict) -> str:
    """Mean rated score against steps per delivered image (log2 axis): best-of-n as a line, the rest as points."""
    width, height, left, top, plot_w, plot_h = 720, 340, 70, 20, 420, 260
    points = cost["points"]
    xs = np.array([p["steps"] for p in points], dtype=np.float64)
    x0, x1 = math.log2(xs.min()) - 0.2, math.log2(xs.max()) + 0.2
    y0, y1 = _axis_range(np.array([p["mean_score"] for p in points]))

    def xy(steps: float, value: float) -> tuple[float, float]:
        return (left + (math.log2(steps) - x0) / (x1 - x0) * plot_w,
                top + plot_h - (value - y0) / (y1 - y0) * plot_h)

    colours = {"best_of_n": "#1f77b4", "random": "#7f7f7f", "predictor": "#d62728", "preview": "#2ca02c"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             'font-family="sans-serif">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    best = sorted((p for p in points if p["policy"] == "best_of_n"), key=lambda p: p["steps"])
    parts.append('<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="'
                 + " ".join("{:.1f},{:.1f}".format(*xy(p["steps"], p["mean_score"])) for p in best) + '"/>')
    for point in points:
        x, y = xy(point["steps"], point["mean_score"])
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colours[point["policy"]]}"/>')
        if point["policy"] == "preview":
            parts.append(f'<text x="{x + 5:.1f}" y="{y - 5:.1f}">{point["m"]}x{point["t"]}</text>')
        elif point["policy"] == "best_of_n":
            parts.append(f'<text x="{x:.1f}" y="{y + 14:.1f}" text-anchor="middle" fill="#1f77b4">{point["n"]}</text>')
    for steps in sorted({p["steps"] for p in best}):
        x, _ = xy(steps, y0)
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{steps}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 30}" text-anchor="middle">'
                 "denoising steps per delivered image (log scale)</text>")
    parts.append(f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">{y0:.3g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{y1:.3g}</text>')
    parts.append(f'<text transform="translate({left - 45},{top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 "mean rated score</text>")
    for row, (key, label) in enumerate((("best_of_n", "best of n (numbers: n)"), ("random", "random seed"),
                                        ("predictor", "predictor top-1"), ("preview", "preview MxT"))):
        ly = top + 12 + row * 18
        parts.append(f'<circle cx="{left + plot_w + 20}" cy="{ly - 4}" r="3.5" fill="{colours[key]}"/>')
        parts.append(f'<text x="{left + plot_w + 30}" y="{ly}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _axis_range(values: np.ndarray) -> tuple[float, float]:
    low, high = float(np.min(values)), float(np.max(values))
    pad = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
    return low - pad, high + pad


def _panel(x: np.ndarray, y: np.ndarray, left: float, title: str, x_label: str, y_label: str,
           size: int = 300, top: int = 30) -> str:
    """One scatter panel: points, a frame, min/max ticks and labels, as SVG elements."""
    (x0, x1), (y0, y1) = _axis_range(x), _axis_range(y)
    px = left + (x - x0) / (x1 - x0) * size
    py = top + size - (y - y0) / (y1 - y0) * size
    dots = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2"/>' for a, b in zip(px, py))
    bottom = top + size
    return (f'<text x="{left + size / 2}" y="{top - 10}" text-anchor="middle" font-weight="600">'
            f'{html.escape(title)}</text>'
            f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#999"/>'
            f'<g fill="#1f77b4" fill-opacity="0.45">{dots}</g>'
            f'<text x="{left}" y="{bottom + 14}">{x0:.3g}</text>'
            f'<text x="{left + size}" y="{bottom + 14}" text-anchor="end">{x1:.3g}</text>'
            f'<text x="{left + size / 2}" y="{bottom + 30}" text-anchor="middle">{html.escape(x_label)}</text>'
            f'<text x="{left - 4}" y="{bottom}" text-anchor="end">{y0:.3g}</text>'
            f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{y1:.3g}</text>'
            f'<text transform="translate({left - 40},{top + size / 2}) rotate(-90)" text-anchor="middle">'
            f'{html.escape(y_label)}</text>')


def scatter_svg(actual: list[np.ndarray], predicted: list[np.ndarray]) -> str:
    """Two panels in one SVG: rated against predicted, raw and centred per prompt (a fixed subset if very many)."""
    raw_x, raw_y = np.concatenate(predicted), np.concatenate(actual)
    centred_x = np.concatenate([p - p.mean() for p in predicted])
    centred_y = np.concatenate([a - a.mean() for a in actual])
    if len(raw_x) > SCATTER_MAX_POINTS:
        subset = np.random.default_rng(0).choice(len(raw_x), SCATTER_MAX_POINTS, replace=False)
        raw_x, raw_y, centred_x, centred_y = raw_x[subset], raw_y[subset], centred_x[subset], centred_y[subset]
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="760" height="380" font-size="11" '
            'font-family="sans-serif">'
            + _panel(raw_x, raw_y, 60, "raw", "predicted score", "rated score")
            + _panel(centred_x, centred_y, 440, "centred per prompt", "predicted - prompt mean", "rated - prompt mean")
            + "</svg>")


def curve_svg(curve: list[dict]) -> str:
    """Mean rated score against n (log2 axis) for the predictor's top-1, a random seed and best-of-n."""
    width, height, left, top, plot_w, plot_h = 720, 340, 70, 20, 400, 260
    lines = (("predictor", "#d62728", "predictor top-1 of n (1 render)"),
             ("random", "#7f7f7f", "random seed (1 render)"),
             ("oracle", "#1f77b4", "best of n (n renders)"))
    ns = [point["n"] for point in curve]
    values = np.array([point[key] for point in curve for key, _, _ in lines], dtype=np.float64)
    y0, y1 = _axis_range(values)
    span = math.log2(max(ns)) or 1.0

    def xy(n: int, value: float) -> tuple[float, float]:
        return left + math.log2(n) / span * plot_w, top + plot_h - (value - y0) / (y1 - y0) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             'font-family="sans-serif">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for n in ns:
        x, _ = xy(n, y0)
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{n}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 30}" text-anchor="middle">'
                 "candidates seen per prompt (n)</text>")
    parts.append(f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">{y0:.3g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{y1:.3g}</text>')
    parts.append(f'<text transform="translate({left - 45},{top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 "mean rated score</text>")
    for row, (key, colour, label) in enumerate(lines):
        points = [xy(point["n"], point[key]) for point in curve]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in points]
        ly = top + 12 + row * 18
        parts.append(f'<line x1="{left + plot_w + 12}" y1="{ly - 4}" x2="{left + plot_w + 30}" y2="{ly - 4}" '
                     f'stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{left + plot_w + 34}" y="{ly}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


if __name__ == "__main__":
    sys.exit(main())
