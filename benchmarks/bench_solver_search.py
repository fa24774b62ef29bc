"""Searched solver schedules against DPM-Solver++, UniPC and a tuned timestep warp, on held-out prompts and seeds.

For each step count K with a searched schedule (the ones shipped for embedded:shapes, or --schedule FILE ...), every
solver renders the same held-out prompts and seeds (never seen by the search: examples/shapes-held-out.txt, seeds
from a range the search does not use) and is measured by its latent RMSE to a reference of the same noises
(DPM-Solver++ at --reference-steps calls) and by the rater's score. Differences are paired (same prompt and seed):
mean and standard error. The warp is DPM-Solver++ on timesteps t_i = (T-1) (1 - i/K)^p, p tuned on training prompts.

    python benchmarks/bench_solver_search.py [--prompts 100] [--seeds 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WARPS = (0.7, 0.85, 1.0, 1.2, 1.5, 2.0)


def read_lines(path: Path, count: int, skip: int = 0) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return lines[skip:skip + count]


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    gap = np.asarray(a) - np.asarray(b)
    return float(gap.mean()), float(gap.std(ddof=1) / math.sqrt(len(gap)))


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def warp_schedule(top: float, steps: int, power: float):
    from actors.models.unified_solver import dpm_solver_pp_schedule

    timesteps = [round(top * (1 - i / steps) ** power, 1) for i in range(steps)]
    return dpm_solver_pp_schedule([max(t, float(steps - i)) for i, t in enumerate(timesteps)], 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:shapes")
    parser.add_argument("--rater", default="shapes")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--prompts", type=int, default=100, help="held-out prompts")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per held-out prompt")
    parser.add_argument("--warp-prompts", type=int, default=16, help="training prompts that tune the warp")
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--schedule", action="append", default=[], help="a schedule.json (default: the shipped)")
    parser.add_argument("--match", default="8,20", help="DPM-Solver++ call counts the searched schedules are set "
                                                        "against (the fewest searched calls at least as close)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from actors.models.embedded import SHIPPED_SCHEDULES, resolve_model
    from actors.models.families import default_image_size
    from actors.models.unified_solver import ScheduleFile, dpm_solver_pp_schedule, solver_timesteps, unipc_schedule
    from actors.stages.solver_evaluator import SolverEvaluator

    torch.set_num_threads(2)
    started = time.time()
    files = [Path(p) for p in args.schedule] or sorted(SHIPPED_SCHEDULES["shapes"].values())
    searched = {}
    for path in files:
        found = ScheduleFile.from_dict(json.loads(path.read_text()), source=str(path))
        searched[found.calls] = found
    width, height = default_image_size(resolve_model(args.model))
    held_out = read_lines(REPO / "examples" / "shapes-held-out.txt", args.prompts)
    pairs = [p for p in held_out for _ in range(args.seeds)]
    seeds = [90_000_000 + i for i in range(len(pairs))]  # a range the search's seeds never reach
    evaluator = SolverEvaluator(args.model, pairs, seeds, args.guidance, height, width, args.rater, batch_size=16,
                                num_threads=2)
    top = float(evaluator.own_config["num_train_timesteps"] - 1)
    reference = evaluator.reference_latents(args.reference_steps)
    evaluator.set_reference(reference)
    reference_score = mean_se(evaluator.rate(reference))

    training = read_lines(REPO / "examples" / "shapes-train.txt", args.warp_prompts, skip=200)
    tuner = SolverEvaluator(args.model, training, list(range(len(training))), args.guidance, height, width, "",
                            batch_size=16, num_threads=2)
    tuner.set_reference(tuner.reference_latents(args.reference_steps))

    results = {"model": args.model, "rater": args.rater, "held_out": {"prompts": len(held_out), "seeds": args.seeds},
               "reference": {"steps": args.reference_steps, "score": reference_score[0],
                             "score_se": reference_score[1]}, "by_steps": {}}
    dpm_rmse = {}
    for steps in sorted(set(searched) | {int(x) for x in args.match.split(",")}):
        base = solver_timesteps(evaluator.own_config, steps)
        solvers = {"dpm++": dpm_solver_pp_schedule(base, 2), "unipc": unipc_schedule(base, 2)}
        if steps in searched:
            power = min(WARPS, key=lambda p: np.mean(tuner.evaluate(warp_schedule(top, steps, p).to_dict())["rmse"]))
            solvers["warp"] = warp_schedule(top, steps, power)
            solvers["searched"] = searched[steps].schedule
        measured = {name: evaluator.evaluate(s.to_dict()) for name, s in solvers.items()}
        dpm_rmse[steps] = float(np.mean(measured["dpm++"]["rmse"]))
        line = {}
        for name, found in measured.items():
            rmse, score = mean_se(found["rmse"]), mean_se(found["score"])
            line[name] = {"rmse": rmse[0], "rmse_se": rmse[1], "score": score[0], "score_se": score[1]}
        if "searched" in measured:
            line["warp"]["power"] = power
            best = min(("dpm++", "unipc", "warp"), key=lambda n: line[n]["rmse"])
            gap, gap_se = paired(measured["searched"]["rmse"], measured[best]["rmse"])
            score_gap, score_gap_se = paired(measured["searched"]["score"], measured[best]["score"])
            line["verdict"] = {
                "closest_baseline": best, "rmse_gap": gap, "rmse_gap_se": gap_se,
                "closer_by_2_se": gap < -2 * gap_se,
                "score_gap": score_gap, "score_gap_se": score_gap_se,
                "score_not_lower_by_2_se": score_gap > -2 * score_gap_se,
                "search": searched[steps].figures.get("search", {}),
            }
        results["by_steps"][steps] = line
        print(f"K={steps}: " + "; ".join(f"{n} {v['rmse']:.4f}±{v['rmse_se']:.4f} / {v['score']:.3f}"
                                          for n, v in line.items() if n != "verdict"), flush=True)
    matches = {}
    for target in (int(x) for x in args.match.split(",")):
        closer = [k for k in sorted(searched)
                  if results["by_steps"][k]["searched"]["rmse"] <= dpm_rmse[target]]
        matches[f"dpm++ at {target}"] = closer[0] if closer else None
    results["searched_calls_matching"] = matches
    results["seconds"] = round(time.time() - started, 1)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def table(results: dict) -> str:
    lines = ["| calls | dpm++ | unipc | warp (p) | searched | searched - closest (paired SE) | score gap (SE) |",
             "|---|---|---|---|---|---|---|"]
    for steps, line in results["by_steps"].items():
        if "searched" not in line:
            continue
        cell = {n: f"{line[n]['rmse']:.3f} / {line[n]['score']:.3f}" for n in ("dpm++", "unipc", "warp", "searched")}
        verdict = line["verdict"]
        lines.append(f"| {steps} | {cell['dpm++']} | {cell['unipc']} | {cell['warp']} ({line['warp']['power']}) | "
                     f"{cell['searched']} | {verdict['rmse_gap']:+.3f} ({verdict['rmse_gap_se']:.3f}) vs "
                     f"{verdict['closest_baseline']} | {verdict['score_gap']:+.3f} ({verdict['score_gap_se']:.3f}) |")
    lines.append(f"\nlatent RMSE to DPM-Solver++ at {results['reference']['steps']} calls / {results['rater']} score; "
                 f"reference score {results['reference']['score']:.3f} ± {results['reference']['score_se']:.3f}; "
                 f"searched calls as close as dpm++ at: {results['searched_calls_matching']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
