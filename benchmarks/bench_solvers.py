"""Solvers against steps: what each `--scheduler` buys per denoising step, on one model and rater.

For each solver and step count, the same prompts and seeds are rendered through seedsift's own render path
(`actors.models.diffusion.load_adapter(..., scheduler=...)`, its `encode` and `render` from the seed's exact latents),
then rated. Two figures per cell:

- mean_score: the rater's mean over all renders (with its standard error);
- gap_to_reference: mean absolute difference in uint8 levels to the same seed rendered by the pipeline's own solver
  at --reference-steps: how far from converged a solver is at that budget. On a random-weight testbed, whose
  rater sees no content, this is the figure that separates solvers; on a trained model both matter.

    .venv/bin/python benchmarks/bench_solvers.py                                 # embedded:tiny-sd, colourfulness
    .venv/bin/python benchmarks/bench_solvers.py --model embedded:shapes --rater shapes --prompts shapes-held-out

One process, no Ray: the solver's trade-off does not depend on the orchestration.
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
from _common import LoadSampler, machine, save

SOLVERS = ("ddim", "euler", "euler-a", "dpm++", "dpm++-karras", "unipc")


def prompts_for(name: str, count: int) -> list[str]:
    """`parti`: the bundled PartiPrompts sample; `shapes-held-out`: the shapes testbed's held-out prompts."""
    if name == "shapes-held-out":
        from actors.testbed.world import held_out_prompts

        return list(held_out_prompts())[:count]
    if name != "parti":
        raise SystemExit(f"--prompts {name!r}: expected parti or shapes-held-out")
    import csv

    path = _common.REPO_ROOT / "examples" / "parti-sample.tsv"
    with open(path, encoding="utf-8") as handle:
        return [row["Prompt"] for row in csv.DictReader(handle, delimiter="\t")][:count]


def render_all(adapter, model_path: str, prompts: list[str], seeds: list[int], steps: int, guidance: float,
               size: tuple[int, int], batch: int) -> np.ndarray:
    import torch

    from actors.models.families import latent_shape
    from actors.models.seeds import batch_noise

    height, width = size
    shape = latent_shape(model_path, height, width)
    pairs = [(p, s) for p in prompts for s in seeds]
    images = []
    with torch.inference_mode():
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            embeds = adapter.encode([p for p, _ in chunk], guidance)
            chunk_seeds = [s for _, s in chunk]
            latents = batch_noise(chunk_seeds, shape)
            images.append(adapter.render(embeds, latents, steps=steps, guidance_scale=guidance, height=height,
                                         width=width, seeds=chunk_seeds))
    return np.concatenate(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:tiny-sd")
    parser.add_argument("--rater", default="colorfulness")
    parser.add_argument("--prompts", default="parti", help="parti (the bundled sample) or shapes-held-out")
    parser.add_argument("--count", type=int, default=24, help="prompts")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--steps", type=int, nargs="*", default=[2, 4, 8, 16, 32])
    parser.add_argument("--solvers", nargs="*", default=list(SOLVERS))
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--name", default=None, help="results file name (default: solvers-<model>)")
    args = parser.parse_args()

    import torch

    from actors.models.families import default_image_size
    from actors.models.diffusion import load_adapter
    from actors.raters.specs import make_rater
    from actors.models.embedded import resolve_model
    from actors.models.seeds import candidate_seeds

    torch.manual_seed(0)
    model_path = resolve_model(args.model)
    size = default_image_size(model_path)
    prompts = prompts_for(args.prompts, args.count)
    seeds = candidate_seeds(0, "bench-solvers", args.seeds)
    rater = make_rater(args.rater)
    prompt_per_image = [p for p in prompts for _ in seeds]

    def rate(images: np.ndarray) -> np.ndarray:
        scores = []
        for start in range(0, len(images), 64):
            scores.extend(rater.score(images[start:start + 64], prompt_per_image[start:start + 64]))
        return np.asarray(scores, dtype=np.float64)

    results = []
    with LoadSampler() as load:
        started = time.time()
        own = load_adapter(model_path, "full")
        reference = render_all(own, model_path, prompts, seeds, args.reference_steps, args.guidance, size,
                               args.batch).astype(np.int16)
        reference_scores = rate(reference.astype(np.uint8))
        for solver in args.solvers:
            adapter = load_adapter(model_path, "full", scheduler=solver)  # once per solver, not per step count
            for steps in args.steps:
                t0 = time.time()
                images = render_all(adapter, model_path, prompts, seeds, steps, args.guidance, size, args.batch)
                seconds = time.time() - t0
                scores = rate(images)
                gap = np.abs(images.astype(np.int16) - reference).mean()
                results.append({"solver": solver, "steps": steps, "mean_score": float(scores.mean()),
                                "score_se": float(scores.std(ddof=1) / np.sqrt(len(scores))),
                                "gap_to_reference": float(gap), "seconds_per_image": seconds / len(images)})
                print(results[-1], flush=True)
        wall = time.time() - started

    by_solver = {solver: {r["steps"]: r for r in results if r["solver"] == solver} for solver in args.solvers}
    header = "| solver | " + " | ".join(f"{s} steps" for s in args.steps) + " |"
    lines = [f"{args.model}, rater {args.rater}, {len(prompts)} prompts x {len(seeds)} seeds, guidance "
             f"{args.guidance}; reference: the pipeline's own solver at {args.reference_steps} steps, mean score "
             f"{reference_scores.mean():.4f}. Cells: mean rated score (± standard error) / mean absolute gap to "
             "the reference image in uint8 levels.", "", header, "|---|" + "---|" * len(args.steps)]
    for solver, cells in by_solver.items():
        lines.append(f"| {solver} | " + " | ".join(
            f"{cells[s]['mean_score']:.4f} (±{cells[s]['score_se']:.4f}) / {cells[s]['gap_to_reference']:.1f}"
            for s in args.steps) + " |")
    name = args.name or "solvers-" + args.model.replace("embedded:", "").replace("/", "-")
    save(name, {"machine": machine(), "load": load.summary(), "wall_s": round(wall, 1),
                "settings": {k: v for k, v in vars(args).items()},
                "reference_mean_score": float(reference_scores.mean()), "results": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
