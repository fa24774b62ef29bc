"""The evaluate job: scores a collected set's candidates with a predictor and reports how well it picks seeds.

Run as `seedsift evaluate --dataset COLLECT_OUT --predictor FOLDER --out REPORT_DIR`; writes evaluation.json,
report.html and contact_sheet.png. Reads what collect and train wrote; nothing later reads what it writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


from jobs.common import add_storage_options, run_job
from jobs.pages.evaluation import CONTACT_SHEET_FILE, contact_sheet, report_html
from orchestrator.evaluation.figures import (EXTRA_NDCG_K, cost_curve, json_safe, measure, per_prompt_rows, predict,
                                             prompt_swap_control)
from orchestrator.evaluation.inputs import check_same_pipeline, choose_split, complete_prompts, select_prompts
from orchestrator.output.storage import Output
from orchestrator.run.config import ConfigError

logger = logging.getLogger("seedsift.evaluate")

REPORT_FILE = "evaluation.json"
HTML_FILE = "report.html"
SCORER_COST_NOTE = ("compute_saved counts renders: the predictor renders 1 image per prompt, best-of-n renders n. "
                    "The predictor also scores N noises per prompt with a small network (scoring_seconds_per_prompt, "
                    "on the CPU); scoring_cost_in_renders puts it in units of one render on this machine, which "
                    "for a real pipeline on a GPU is small next to a render's cost")

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
    from orchestrator.output.dataset import dataset_identity, dataset_solver_schedule, read_dataset
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
    identity["solver_schedule"] = dataset_solver_schedule(args.dataset, identity)  # renders as the rows were made
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
    if identity["solver_schedule"] is not None and args.previews.strip().lower() == "auto":
        previews = []  # a searched schedule cannot pause a denoising: no preview fits it
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
    evaluation = json_safe(evaluation)
    output.write_bytes(HTML_FILE, report_html(evaluation, groups.scores, predicted).encode("utf-8"))
    output.write_json(REPORT_FILE, evaluation)  # last: its presence means the report is complete
    return evaluation


# ------------------------------------------------------------------------------------------------ figures


# ----------------------------------------------------------------------------------------- contact sheet


# ------------------------------------------------------------------------------------------------ report


if __name__ == "__main__":
    sys.exit(main())
