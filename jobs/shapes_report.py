"""The shapes-report job: validates the `shapes` rater on drawn scenes and measures `embedded:shapes` on held-out prompts.

Run as `python -m jobs.shapes_report --out DIR`; writes DIR/report.json and DIR/contact.png and prints the tables
that docs/shapes.md quotes. Renders go through seedsift's own path (actors.models.diffusion, actors.models.seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from actors.testbed import world as shapes
from jobs.common import run_job

# What each probe tests, in the order the validation table lists them.
PROBES = (
    "present as captioned",  # the caption's own objects: colour and shape found
    "present, other colour",  # same shape, another colour: colour told apart
    "present, other shape",  # same colour, another shape: shape told apart
    "count as captioned",
    "count, other number",
    "count, any kind",  # a random kind and number, true or false as the scene happens to be
    "relation as captioned",
    "relation, swapped objects",
    "relation, opposite side",
    "relation, any pair",  # two kinds present in the scene, a random relation
)


def probe_facts(scene: shapes.Scene, rng: np.random.Generator) -> list[tuple[str, shapes.Fact]]:
    """(probe, fact) pairs: the scene's own facts (all true) and perturbed ones (wrong colour, shape, count, side)."""
    probes: list[tuple[str, shapes.Fact]] = []
    kinds = shapes.all_kinds()
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for fact in scene.facts:
        if fact.type == "present":
            colours = [c for c in shapes.COLOURS if c != fact.kind.colour]
            others = [s for s in shapes.SHAPES if s != fact.kind.shape]
            probes.append(("present as captioned", fact))
            probes.append(("present, other colour",
                           shapes.Fact("present", shapes.Kind(str(rng.choice(colours)), fact.kind.shape))))
            probes.append(("present, other shape",
                           shapes.Fact("present", shapes.Kind(fact.kind.colour, str(rng.choice(others))))))
        elif fact.type == "count":
            wrong = [n for n in (1, 2, 3, 4) if n != fact.count]
            probes.append(("count as captioned", fact))
            probes.append(("count, other number", shapes.Fact("count", fact.kind, count=int(rng.choice(wrong)))))
        else:
            assert fact.other is not None
            probes.append(("relation as captioned", fact))
            probes.append(("relation, swapped objects",
                           shapes.Fact("relation", fact.other, relation=fact.relation, other=fact.kind)))
            probes.append(("relation, opposite side",
                           shapes.Fact("relation", fact.kind, relation=opposite[fact.relation], other=fact.other)))
    present = sorted({obj.kind for obj in scene.objects}, key=str)
    if len(present) >= 2:
        a, b = (present[i] for i in rng.choice(len(present), size=2, replace=False))
        probes.append(("relation, any pair",
                       shapes.Fact("relation", a, relation=str(rng.choice(shapes.RELATIONS)), other=b)))
    probes.append(("count, any kind",
                   shapes.Fact("count", kinds[int(rng.integers(len(kinds)))], count=int(rng.integers(1, 5)))))
    return probes


def _tally(row: dict[str, int], truth: bool, verdict: bool) -> None:
    row["n"] += 1
    row["true"] += truth
    row["correct"] += verdict == truth
    row["false_positive"] += verdict and not truth
    row["false_negative"] += truth and not verdict


def _with_accuracy(table: dict, order: tuple[str, ...]) -> dict:
    return {key: {**table[key], "accuracy": table[key]["correct"] / table[key]["n"]} for key in order if key in table}


# How --degraded validation roughens a scene towards what the model draws: soft edges, colour drift, grain.
DEGRADE_BLUR_RADIUS = (0.5, 1.0)  # Gaussian blur radius in pixels, uniform
DEGRADE_COLOUR_SHIFT = 15  # per channel, uniform in +-15 levels, the same over the whole image
DEGRADE_NOISE = 3.0  # per pixel and channel, Gaussian standard deviation in levels


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The scene blurred, colour-shifted and grained (uint8 in, uint8 out); the objects stay where they are."""
    from PIL import Image, ImageFilter

    radius = rng.uniform(*DEGRADE_BLUR_RADIUS)
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    shift = rng.integers(-DEGRADE_COLOUR_SHIFT, DEGRADE_COLOUR_SHIFT + 1, size=3)
    noisy = blurred + shift + rng.normal(0.0, DEGRADE_NOISE, size=image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def validate_rater(scenes: int, seed: int, degraded: bool = False) -> dict:
    """Rater verdicts against ground truth, per fact type and per probe, on fresh scenes of both splits.

    With `degraded`, the rater reads each scene after `degrade` (the same scenes and probes as without it).
    """
    from actors.testbed.rater import detect_objects, rate

    rng = np.random.default_rng(seed)
    degrade_rng = np.random.default_rng([seed, 1])  # separate, so the scenes do not depend on `degraded`
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_probe: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    own_scores, wrong_scores, exact_objects = [], [], 0
    prompts = {name: shapes.template_prompts(name) for name in shapes.TEMPLATES}  # both splits
    for _ in range(scenes):
        scene = shapes.draw_scene(shapes.random_prompt(rng, templates=prompts), rng)
        image = degrade(scene.image, degrade_rng) if degraded else scene.image
        detected = detect_objects(image)
        found = sorted(str(obj.kind) for obj in detected)
        exact_objects += found == sorted(str(obj.kind) for obj in scene.objects)
        for probe, fact in probe_facts(scene, rng):
            truth = shapes.fact_holds(fact, scene.objects)
            verdict = shapes.fact_holds(fact, detected)
            _tally(by_type[fact.type], truth, verdict)
            _tally(by_probe[probe], truth, verdict)
        own_scores.append(rate(image, scene.caption).score)
        wrong_scores.append(rate(image, shapes.random_prompt(rng, templates=prompts)).score)
    return {
        "scenes": scenes,
        "degraded": degraded,
        "per_fact_type": _with_accuracy(by_type, shapes.FACT_TYPES),
        "per_probe": _with_accuracy(by_probe, PROBES),
        "scenes_with_exact_object_list": exact_objects / scenes,
        "mean_score_own_caption": float(np.mean(own_scores)),
        "mean_score_random_caption": float(np.mean(wrong_scores)),
    }


def mismatched_prompts(prompts: list[str]) -> dict[str, str]:
    """For each prompt, the next prompt of the same template in the list (cyclically): the prompt-follows control.

    A template with a single prompt in the list borrows the next prompt of the whole list instead.
    """
    by_template: dict[str, list[str]] = defaultdict(list)
    for prompt in prompts:
        by_template[shapes.parse_prompt(prompt).template].append(prompt)
    mismatched = {}
    for index, prompt in enumerate(prompts):
        group = by_template[shapes.parse_prompt(prompt).template]
        if len(group) > 1:
            mismatched[prompt] = group[(group.index(prompt) + 1) % len(group)]
        else:
            mismatched[prompt] = prompts[(index + 1) % len(prompts)]
    return mismatched


def measure_model(model: str, prompts: list[str], seeds_per_prompt: int, steps: int, guidance: float,
                  batch: int, run_seed: int) -> dict:
    """Rated scores of `seeds_per_prompt` seeds per prompt, rendered through actors.models.diffusion with seedsift's
    seeds.

    Each image is also rated against a mismatched prompt of the same template (`mismatched_scores`): if the model
    follows its prompt, an image satisfies its own prompt's facts far more often than another prompt's.
    """
    import torch

    from actors.models import diffusion, families
    from actors.models.embedded import resolve_model
    from actors.models.seeds import batch_noise, candidate_seeds
    from actors.testbed.rater import rate

    model_path = resolve_model(model)
    text = diffusion.load_adapter(model_path, "text")
    renderer = diffusion.load_adapter(model_path, "render")
    width, height = families.default_image_size(model_path)
    shape = families.latent_shape(model_path, height, width)
    rows = []
    images_by_prompt: dict[str, np.ndarray] = {}
    mismatched = mismatched_prompts(prompts)
    started = time.time()
    for prompt in prompts:
        seeds = candidate_seeds(run_seed, prompt, seeds_per_prompt)
        embeds = text.encode([prompt], guidance)
        images = []
        for start in range(0, len(seeds), batch):
            chunk = seeds[start : start + batch]
            repeated = {key: np.repeat(value, len(chunk), axis=0) for key, value in embeds.items()}
            with torch.no_grad():
                images.append(renderer.render(repeated, batch_noise(chunk, shape), steps=steps,
                                          guidance_scale=guidance, height=height, width=width))
        images = np.concatenate(images)
        images_by_prompt[prompt] = images
        ratings = [rate(image, prompt) for image in images]
        mismatched_ratings = [rate(image, mismatched[prompt]) for image in images]
        rows.append({
            "prompt": prompt,
            "mismatched_prompt": mismatched[prompt],
            "mismatched_scores": [r.score for r in mismatched_ratings],
            "mismatched_fractions": [r.fraction for r in mismatched_ratings],
            "template": shapes.parse_prompt(prompt).template,
            "seeds": seeds,
            "scores": [r.score for r in ratings],
            "fractions": [r.fraction for r in ratings],
            "facts": [[int(v) for v in r.satisfied] for r in ratings],
        })
        if len(rows) % 10 == 0:
            print(f"rendered and rated {len(rows)}/{len(prompts)} prompts ({time.time() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    seconds = time.time() - started
    return {"rows": rows, "seconds": seconds, "images": images_by_prompt,
            "model_path": model_path, "width": width, "height": height}


def summarise(rows: list[dict]) -> dict:
    fractions = np.array([row["fractions"] for row in rows])
    scores = np.array([row["scores"] for row in rows])
    varies = fractions.max(axis=1) > fractions.min(axis=1)
    mismatched_scores = np.array([row["mismatched_scores"] for row in rows])
    mismatched_fractions = np.array([row["mismatched_fractions"] for row in rows])
    per_fact_type: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        facts = shapes.parse_prompt(row["prompt"]).facts
        satisfied = np.array(row["facts"])  # (seeds, facts)
        for index, fact in enumerate(facts):
            per_fact_type[fact.type].append(float(satisfied[:, index].mean()))
    summary = {
        "prompts": len(rows),
        "seeds_per_prompt": int(scores.shape[1]),
        "mean_score": float(scores.mean()),
        "mean_fact_fraction": float(fractions.mean()),
        "share_of_prompts_whose_seeds_vary": float(varies.mean()),
        "share_all_seeds_all_facts": float((fractions.min(axis=1) == 1).mean()),
        "share_all_seeds_no_fact": float((fractions.max(axis=1) == 0).mean()),
        "mean_best_of_seeds_score": float(scores.max(axis=1).mean()),
        "mean_within_prompt_score_std": float(scores.std(axis=1).mean()),
        "mean_score_mismatched_prompt": float(mismatched_scores.mean()),
        "mean_fact_fraction_mismatched_prompt": float(mismatched_fractions.mean()),
        # Prompts whose 16 images score higher on average with their own prompt than with the mismatched one.
        "share_prompts_own_beats_mismatched": float((scores.mean(axis=1) > mismatched_scores.mean(axis=1)).mean()),
        "fact_satisfaction_by_type": {k: float(np.mean(v)) for k, v in sorted(per_fact_type.items())},
        "per_template": {},
    }
    for template in shapes.TEMPLATES:
        mine = [i for i, row in enumerate(rows) if row["template"] == template]
        if mine:
            summary["per_template"][template] = {
                "prompts": len(mine),
                "mean_score": float(scores[mine].mean()),
                "mean_fact_fraction": float(fractions[mine].mean()),
                "share_seeds_vary": float(varies[mine].mean()),
                "mean_best_of_seeds_score": float(scores[mine].max(axis=1).mean()),
            }
    return summary


def contact_sheet(images_by_prompt: dict[str, np.ndarray], path: Path, prompts: list[str], seeds: int,
                  scale: int = 2) -> None:
    """A PNG grid: one row per prompt (its caption on the left), `seeds` renders per row."""
    from PIL import Image, ImageDraw

    tile = 64 * scale
    label_width = 250  # the longest held-out caption is about 240 pixels in PIL's default font
    sheet = Image.new("RGB", (label_width + seeds * (tile + 2), len(prompts) * (tile + 2)), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for row, prompt in enumerate(prompts):
        y = row * (tile + 2)
        pen.text((4, y + tile // 2 - 6), prompt, fill=(0, 0, 0))
        for column, image in enumerate(images_by_prompt[prompt][:seeds]):
            picture = Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST)
            sheet.paste(picture, (label_width + column * (tile + 2), y))
    sheet.save(path)


def print_tables(report: dict) -> None:
    validation = report.get("rater_validation")
    if validation:
        kind = "degraded drawn" if validation["degraded"] else "drawn"
        print(f"\nrater validation on {validation['scenes']} {kind} scenes "
              f"(exact object list: {validation['scenes_with_exact_object_list']:.1%})")
        print("| fact type | probes | true | accuracy | false pos. | false neg. |\n|---|---|---|---|---|---|")
        for table in ("per_fact_type", "per_probe"):
            for name, row in validation[table].items():
                print(f"| {name} | {row['n']} | {row['true']} | {row['accuracy']:.1%} | {row['false_positive']} "
                      f"| {row['false_negative']} |")
        print(f"mean score, own caption {validation['mean_score_own_caption']:.3f}; "
              f"random caption {validation['mean_score_random_caption']:.3f}")
    model = report.get("model")
    if model:
        print(f"\nmodel {model['model']} on {model['prompts']} held-out prompts x {model['seeds_per_prompt']} seeds, "
              f"{model['steps']} steps, guidance {model['guidance']} ({model['seconds']:.0f} s)")
        for key in ("mean_score", "mean_fact_fraction", "share_of_prompts_whose_seeds_vary",
                    "share_all_seeds_all_facts", "share_all_seeds_no_fact", "mean_best_of_seeds_score",
                    "mean_within_prompt_score_std", "mean_score_mismatched_prompt",
                    "mean_fact_fraction_mismatched_prompt", "share_prompts_own_beats_mismatched"):
            print(f"  {key}: {model[key]:.3f}")
        print("  fact satisfaction by type: "
              + ", ".join(f"{k} {v:.3f}" for k, v in model["fact_satisfaction_by_type"].items()))
        print("| template | prompts | mean score | facts satisfied | seeds vary | best of seeds |\n"
              "|---|---|---|---|---|---|")
        for template, row in model["per_template"].items():
            print(f"| {template} | {row['prompts']} | {row['mean_score']:.3f} | {row['mean_fact_fraction']:.3f} "
                  f"| {row['share_seeds_vary']:.0%} | {row['mean_best_of_seeds_score']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seedsift shapes_report", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", required=True, help="folder for report.json and contact.png")
    add("--model", default="embedded:shapes", help="pipeline to measure (default: %(default)s)")
    add("--scenes", type=int, default=2000, help="drawn scenes for the rater validation (0 skips it)")
    add("--prompts", type=int, default=100, help="held-out prompts to render (0 skips the model; at most 100)")
    add("--seeds", type=int, default=16, help="seeds per prompt")
    add("--steps", type=int, default=20, help="denoising steps")
    add("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    add("--batch-size", type=int, default=16, help="images per render call")
    add("--degraded", action="store_true", help="validate the rater on blurred, colour-shifted, grainy scenes")
    add("--seed", type=int, default=0, help="run seed: candidate seeds and validation scenes derive from it")
    add("--threads", type=int, default=2, help="torch threads")
    add("--contact-prompts", type=int, default=12, help="prompts (rows) on the contact sheet")
    add("--contact-seeds", type=int, default=8, help="seeds (columns) on the contact sheet")
    args = parser.parse_args(argv)

    def body() -> int:
        import torch

        torch.set_num_threads(args.threads)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report: dict = {}
        if args.scenes:
            started = time.time()
            report["rater_validation"] = validate_rater(args.scenes, args.seed, degraded=args.degraded)
            report["rater_validation"]["seconds"] = time.time() - started
        if args.prompts:
            prompts = shapes.held_out_prompts()
            # A spread of templates even for a short run: every k-th prompt of the template-ordered list.
            prompts = prompts[:: max(1, len(prompts) // args.prompts)][: args.prompts]
            measured = measure_model(args.model, prompts, args.seeds, args.steps, args.guidance, args.batch_size,
                                     args.seed)
            report["model"] = {"model": args.model, "steps": args.steps, "guidance": args.guidance,
                               "seconds": measured["seconds"], **summarise(measured["rows"])}
            report["rows"] = measured["rows"]
            step = max(1, len(prompts) // args.contact_prompts)
            contact_sheet(measured["images"], out / "contact.png", prompts[::step][: args.contact_prompts],
                          args.contact_seeds)
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        print_tables(report)
        return 0

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
