"""The search-solver job: searches a solver schedule with exactly K model calls for one model (S³) and writes it as
OUT/schedule.json, for `--scheduler schedule:OUT/schedule.json`.

Run as `seedsift search-solver --model M --steps K --prompts P --out DIR [--rater R]`, or on a cluster
`ray job submit -- python -m jobs.search_solver ...` (its evaluators spread over the cluster's CPUs or GPUs).
A killed search resumes from DIR with the same command.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import add_storage_options, run_job
from orchestrator.run.config import ConfigError


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="seedsift search-solver", description=__doc__.splitlines()[0])
    add = result.add_argument
    add("--model", required=True, help="pipeline folder, hub id, or embedded:NAME")
    add("--steps", type=int, required=True, help="K: model calls of the searched schedule")
    add("--prompts", required=True, help="corpus of training prompts (txt, jsonl, csv/tsv, parquet; local or s3://)")
    add("--out", required=True, help="folder for schedule.json and the search's state (local or s3://)")
    add("--rater", default="", help="rater spec for the score guard (none by default: the distance alone)")
    add("--train-prompts", type=int, default=16, help="prompts the search measures on (the corpus's first ones)")
    add("--holdout-prompts", type=int, default=16, help="the next prompts: the result's held-out figures")
    add("--seeds-per-prompt", type=int, default=2)
    add("--reference-steps", type=int, default=100, help="DPM-Solver++ calls of the reference")
    add("--population", type=int, default=8, help="parents kept per generation")
    add("--offspring", type=int, default=8, help="schedules truly evaluated per generation")
    add("--proposals", type=int, default=4, help="mutants the surrogate ranks per evaluation")
    add("--generations", type=int, default=4)
    add("--no-surrogate", action="store_true", help="evaluate the first proposals, unranked")
    add("--guidance", type=float, default=None, help="default: the model's, as generate")
    add("--width", type=int, default=None)
    add("--height", type=int, default=None)
    add("--seed", type=int, default=0)
    add("--evaluators", type=int, default=1, help="evaluator actors (one model each)")
    add("--evaluator-cpus", type=float, default=1.0)
    add("--json", action="store_true", help="print the whole schedule.json at the end")
    add_storage_options(result)
    return result


def read_prompts(uri: str, count: int, storage_options: dict) -> list[str]:
    """The corpus's first `count` usable prompts, read on the driver."""
    from orchestrator.corpus.listing import read_corpus_local

    prompts = []
    for row in read_corpus_local(uri, storage_options):
        if row.get("status", "ok") == "ok" and row.get("prompt"):
            prompts.append(row["prompt"])
            if len(prompts) >= count:
                break
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        from actors.models.embedded import model_defaults, resolve_model
        from actors.models.families import default_image_size
        from orchestrator.flow.console import Console
        from orchestrator.search.solver_search import SearchSettings, SolverSearch

        if args.rater:
            from actors.raters.specs import validate_rater_spec

            try:
                validate_rater_spec(args.rater)
            except ValueError as exc:
                raise ConfigError(f"--rater {args.rater}: {exc}") from exc
        if args.train_prompts < 1 or args.holdout_prompts < 0:
            raise ConfigError("--train-prompts must be at least 1 and --holdout-prompts 0 or more")
        prompts = read_prompts(args.prompts, args.train_prompts + args.holdout_prompts, args.storage_options)
        if len(prompts) < args.train_prompts + 1 and args.holdout_prompts:
            raise ConfigError(f"--prompts {args.prompts}: {len(prompts)} usable prompts; the search needs "
                              f"--train-prompts {args.train_prompts} and at least one held-out prompt")
        try:
            model_path = resolve_model(args.model)
        except ValueError as exc:
            raise ConfigError(f"--model {args.model}: {exc}") from exc
        width, height = default_image_size(model_path)
        guidance = args.guidance if args.guidance is not None else model_defaults(args.model).get("guidance", 7.5)
        settings = SearchSettings(
            model=args.model, steps=args.steps, prompts=tuple(prompts[:args.train_prompts]),
            holdout=tuple(prompts[args.train_prompts:]), seeds_per_prompt=args.seeds_per_prompt,
            guidance=guidance, height=args.height or height, width=args.width or width, rater=args.rater,
            reference_steps=args.reference_steps, population=args.population, offspring=args.offspring,
            proposals=args.proposals, generations=args.generations, surrogate=not args.no_surrogate, seed=args.seed)
        with Console() as console:
            bar = _bar(console, settings)
            search = SolverSearch(settings, args.out, args.storage_options, evaluators=args.evaluators,
                                  evaluator_cpus=args.evaluator_cpus, say=console.say, progress=bar)
            result = search.run()
            console.say(_summary(result, args.out))
        if args.json:
            print(json.dumps(result, indent=2))
        return 0

    return run_job(body, args.out)


def _bar(console, settings):
    """A tqdm bar of true evaluations on a terminal; nothing elsewhere (each generation says its line)."""
    if not getattr(console.stream, "isatty", lambda: False)():
        return None
    from tqdm import tqdm

    total = max(settings.population, 4) + settings.generations * settings.offspring
    bar = tqdm(total=total, unit="schedule", desc="evaluations", file=console.stream)
    return bar.update


def _summary(result: dict, out: str) -> str:
    lines = [f"done: a {result['calls']}-call schedule for {result['model']['name']}, training latent RMSE "
             f"{result['objective']['training']['value']:.4f} ({result['figures']['search']['evaluations']} "
             "schedules evaluated)"]
    for name, line in (result["figures"].get("holdout") or {}).items():
        lines.append(f"  held out, {name}: latent RMSE {line['rmse']:.4f} ± {line['rmse_se']:.4f}"
                     + (f", score {line['score']:.3f} ± {line['score_se']:.3f}" if "score" in line else ""))
    lines.append(f"written: {out.rstrip('/')}/schedule.json (use --scheduler schedule:{out.rstrip('/')}/schedule.json "
                 f"--steps {result['calls']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
