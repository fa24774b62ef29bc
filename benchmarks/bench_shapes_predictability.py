"""How stable a seed's rated score is under small moves of its initial noise, on embedded:shapes.

A noise predictor learns a smooth function of the noise from a finite collect: its ranking barely moves when the
noise moves a little. If the rated outcome of a seed does move, a smooth predictor has little to hold on to. Three
probes, all through seedsift's own render path (`load_adapter`, `encode`, `render` from the seed's exact latents)
and the `shapes` rater, 20 DDIM steps, guidance 5, on held-out prompts of every template (every k-th of the
testbed's held-out list, which is ordered by template):

- **nearby noise**: each seed's noise z is replaced by sqrt(1 - e^2) z + e w (w another standard-normal draw, so the
  result is still standard normal; e = 0.05 moves it by 5 % of its norm). Reported per e: the per-prompt Spearman
  between the scores at z and at the moved noise, the share of images whose satisfied facts change, and the gain
  (in per-prompt sd of the scores at z) of picking the seed whose moved noise scored best: what a predictor that
  knew the exact score at one moved noise would achieve (one draw of w per seed, the same w for every e: not a
  bound, since a smooth predictor could approach the mean score over many nearby noises). Beside
  it, how much the shipped predictor's own ranking moves under the same move (it should barely: it is a smooth
  function of the noise, which is why an outcome that moves is out of its reach).
- **mirror**: the latent z flipped left-right, and "left" and "right" swapped in the prompt. The scenes the model
  was trained on are mirror-symmetric; a model whose denoiser and decoder were mirror-equivariant (nothing forces
  them to be) would give the mirrored seed the same score.
- **other prompt, same seeds**: every prompt is rendered from the same N seeds, so the per-seed scores of two
  prompts can be compared: Spearman between prompts of the same template and of different templates. High values
  mean a seed is good or bad for every prompt alike (the random-weight tiny-sd testbed: 0.91); values near 0 mean
  what makes a seed good is specific to the prompt, which a predictor must learn from the text. (Pairs overlap and
  the groups are confounded with template: only two-phrase prompts can share a kind without being identical.)

    .venv/bin/python benchmarks/bench_shapes_predictability.py                       # 32 prompts x 16 seeds

One process, no Ray.
"""

from __future__ import annotations

import argparse
import itertools
import re
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
from _common import LoadSampler, machine, save

NEARBY = (0.05, 0.1, 0.2, 0.4)


def mirrored_prompt(prompt: str) -> str:
    """The prompt of the left-right mirrored scene: "left" and "right" exchanged."""
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m.group(1) == "left" else "left", prompt)


def moved_noise(noise, seeds: list[int], amount: float):
    """sqrt(1 - e^2) z + e w with w drawn from a stream of each seed apart from its own: still standard normal."""
    from actors.models.seeds import batch_noise

    other = batch_noise([seed ^ 0x5EED5EED for seed in seeds], tuple(noise.shape[1:]))
    return (1.0 - amount ** 2) ** 0.5 * noise + amount * other


def spread_prompts(prompts: list[str], count: int) -> list[str]:
    """Every k-th prompt, so that a list ordered by template gives prompts of every template."""
    return prompts[::max(1, len(prompts) // count)][:count]


def pair_agreement(prompts: list[str], scores: np.ndarray) -> dict[str, list[float]]:
    """Per-seed Spearman of every two prompts rendered from the same seeds, grouped by what the prompts share: an
    object kind (colour and shape), a colour only, nothing; and separately, the same template or not."""
    from actors.predictor.metrics import spearman
    from actors.testbed.world import parse_prompt

    parsed = [parse_prompt(prompt) for prompt in prompts]
    kinds = [{kind for kind, _count in p.phrases} for p in parsed]
    colours = [{kind.colour for kind in k} for k in kinds]
    groups: dict[str, list[float]] = {"share an object kind (colour and shape)": [], "share a colour only": [],
                                      "share no colour": [], "same template": [], "different templates": []}
    for i, j in itertools.combinations(range(len(prompts)), 2):
        value = spearman(scores[i], scores[j])
        if np.isnan(value):
            continue
        shared = ("share an object kind (colour and shape)" if kinds[i] & kinds[j]
                  else "share a colour only" if colours[i] & colours[j] else "share no colour")
        groups[shared].append(value)
        groups["same template" if parsed[i].template == parsed[j].template else "different templates"].append(value)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts (spread over the templates)")
    parser.add_argument("--seeds", type=int, default=16, help="seeds, the same for every prompt")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (the shipped predictor's setting: 20)")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale (shipped setting: 5)")
    parser.add_argument("--nearby", type=float, nargs="*", default=list(NEARBY), help="moves e of the noise")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--name", default="shapes-predictability")
    args = parser.parse_args()

    import torch

    from actors.models.families import default_image_size, latent_shape
    from actors.models.diffusion import load_adapter
    from actors.testbed.rater import rate
    from actors.models.embedded import resolve_model
    from actors.predictor.metrics import per_prompt_spearman, top1_gain
    from orchestrator.run.predictor_files import load_predictor, resolve_predictor
    from actors.models.seeds import batch_noise, candidate_seeds
    from actors.testbed.world import held_out_prompts

    torch.manual_seed(0)
    model_path = resolve_model("embedded:shapes")
    height, width = default_image_size(model_path)
    shape = latent_shape(model_path, height, width)
    prompts = spread_prompts(list(held_out_prompts()), args.prompts)
    seeds = candidate_seeds(0, "bench-shapes-predictability", args.seeds)
    adapter = load_adapter(model_path, "full")
    predictor = load_predictor(resolve_predictor(None, "embedded:shapes"), model_path, height, width)
    base_noise = batch_noise(seeds, shape)

    def render_rate_and_predict(prompt_list: list[str], noise) -> tuple[np.ndarray, list, np.ndarray]:
        """Rated scores (prompts, seeds), each image's satisfied-fact tuple (prompts outermost) and the shipped
        predictor's scores (prompts, seeds), from one encoding of each prompt."""
        scores, facts, predicted = [], [], []
        with torch.inference_mode():
            for prompt in prompt_list:
                embeds = adapter.encode([prompt] * len(seeds), args.guidance)
                embeds.pop("truncated", None)
                predicted.append(predictor.score_candidates(noise, {k: v[0] for k, v in embeds.items()}))
                for start in range(0, len(seeds), args.batch):
                    rows = slice(start, start + args.batch)
                    images = adapter.render({k: v[rows] for k, v in embeds.items()}, noise[rows], steps=args.steps,
                                            guidance_scale=args.guidance, height=height, width=width,
                                            seeds=seeds[rows])
                    for image in images:
                        rating = rate(image, prompt)
                        scores.append(rating.score)
                        facts.append(rating.satisfied)
        return np.asarray(scores).reshape(len(prompt_list), len(seeds)), facts, np.asarray(predicted)

    def compare(name: str, base: np.ndarray, base_facts, base_predicted: np.ndarray, other: np.ndarray, other_facts,
                other_predicted: np.ndarray, **extra) -> dict:
        correlations = per_prompt_spearman(list(zip(other, base)))
        predictor_moves = per_prompt_spearman(list(zip(other_predicted, base_predicted)))
        gains = np.array([top1_gain(o, b)["gain_std_units"] for b, o in zip(base, other)])
        changed = np.mean([a != b for a, b in zip(base_facts, other_facts)])
        row = {"probe": name, **extra,
               "per_prompt_spearman": float(np.nanmean(correlations)),
               "facts_changed_share": float(changed), "pick_gain_sd": float(np.nanmean(gains)),
               "predictor_spearman": float(np.nanmean(predictor_moves)),
               "mean_score": float(other.mean()),
               "per_prompt": {"spearman": correlations.round(4).tolist(), "pick_gain_sd": gains.round(4).tolist()},
               "scores": other.round(4).tolist()}
        print({k: v for k, v in row.items() if k not in ("per_prompt", "scores")}, flush=True)
        return row

    rows = []
    with LoadSampler() as load:
        started = time.time()
        base, base_facts, base_predicted = render_rate_and_predict(prompts, base_noise)
        best = np.array([top1_gain(b, b)["gain_std_units"] for b in base])
        for amount in args.nearby:
            moved = render_rate_and_predict(prompts, moved_noise(base_noise, seeds, amount))
            rows.append(compare(f"nearby noise e={amount}", base, base_facts, base_predicted, *moved, amount=amount))
        # Mirrored seeds of the mirrored prompt, compared fact by fact with the unmirrored render's facts.
        mirrored = render_rate_and_predict([mirrored_prompt(p) for p in prompts], torch.flip(base_noise, dims=[3]))
        rows.append(compare("mirror (noise flipped, left/right swapped)", base, base_facts, base_predicted, *mirrored))
        pairs = pair_agreement(prompts, base)
        wall = time.time() - started

    lines = [(f"embedded:shapes, rater shapes, {len(prompts)} held-out prompts x {len(seeds)} seeds (the same seeds "
             f"for every prompt), {args.steps} DDIM steps, guidance {args.guidance}. Mean score at the seeds' own "
             f"noise {base.mean():.3f}; picking the true best of {len(seeds)} gains {np.nanmean(best):+.2f} per-prompt "
             "sd."),
             "", ("| probe | per-prompt Spearman with the score at the seed's own noise | images whose satisfied "
             "facts change | gain of the pick, per-prompt sd | shipped predictor: Spearman with its own ranking at "
             "the seed's own noise |"), "|---|---|---|---|---|"]
    lines += [f"| {r['probe']} | {r['per_prompt_spearman']:.3f} | {r['facts_changed_share']:.1%} | "
              f"{r['pick_gain_sd']:+.2f} | {r['predictor_spearman']:.3f} |" for r in rows]
    lines += ["", "Same seeds, other prompt: per-seed Spearman between two prompts' scores, by what they share:", "",
              "| prompt pairs | pairs | per-seed Spearman |", "|---|---|---|"]
    lines += [f"| {group} | {len(values)} | {np.mean(values):.3f} |" for group, values in pairs.items() if values]
    save(args.name, {"machine": machine(), "load": load.summary(), "wall_s": round(wall, 1),
                     "settings": vars(args), "prompts": prompts,
                     "base_mean_score": float(base.mean()), "true_best_gain_sd": float(np.nanmean(best)),
                     "probes": rows,
                     "other_prompt_same_seeds": {group: {"pairs": len(values), "mean_spearman": float(np.mean(values))}
                                                 for group, values in pairs.items() if values},
                     "scores_at_own_noise": base.round(4).tolist()}, "\n".join(lines))


if __name__ == "__main__":
    main()
