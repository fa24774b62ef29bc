"""Sparse self-attention and Re-ttention (issue 22): fidelity on the trained testbeds, kernel time, render time.

Three parts, each a table in benchmarks/README.md (figure 12):

- fidelity: held-out prompts of the shapes world, one seed each, DDIM at 20 steps, guidance 5, rendered with full
  attention and with each mode (naive sparse, ratio only, residual only, Re-ttention) at densities 0.031, 0.0625 and
  0.125 under two full-step schedules; PSNR of each image to its full-attention render and the `shapes` rater's
  score, on `embedded:shapes-dit` (PixArt-layout transformer, 64 tokens per self-attention) and `embedded:shapes`
  (UNet; its self-attention layers see 64 tokens too).
- kernel: one self-attention call in PixArt-XL's layout (16 heads of 72, batch 2 for guidance) at 4,096 and 16,384
  tokens: dense SDPA, a sparse step (block-sparse kernel, blocks of tokens/64), Re-ttention's full step (dense with
  the ratio, plus the band for the residual), and the schedule's average per step.
- render: the seconds of a whole render of the testbed DiT with and without Re-ttention (64 tokens: the kernel's
  bookkeeping against a tiny dense call), and one forward of a random-weight PixArt-XL-width transformer (2 of its
  28 blocks) at 4,096 tokens, a full step against a sparse one.

    python benchmarks/bench_attention.py [--parts fidelity kernel render] [--prompts 64] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.models import diffusion  # noqa: E402
from actors.models.attention import SEQUENCE_BLOCKS, SparseSelfAttention, StepClock, full_step  # noqa: E402
from actors.models.attention_plan import AttentionPlan, paper_full_steps  # noqa: E402
from actors.models.embedded import resolve_model  # noqa: E402
from actors.models.families import latent_shape  # noqa: E402
from actors.models.seeds import batch_noise  # noqa: E402
from actors.models.sparse_attention import band_block_mask, block_sparse_attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
SCHEDULES = {"paper 8/20": paper_full_steps(STEPS), "5/20": (0, 1, 2, 8, 14)}
MODES = ("sparse", "ratio", "residual", "re-ttention")
DENSITIES = (0.031, 0.0625, 0.125)
MODELS = ("embedded:shapes-dit", "embedded:shapes")


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image, in dB, capped at 99 for identical images."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), 99.0)


def fidelity(prompts: list[str], batch: int, models: list[str]) -> list[dict]:
    from actors.raters.specs import make_rater

    rater = make_rater("shapes")
    rows = []
    for model in models:
        path = resolve_model(model)
        adapter = diffusion.load_adapter(path, "full")
        embeds = adapter.encode(prompts, 5.0)
        embeds.pop("truncated", None)
        latents = batch_noise([1000 + i for i in range(len(prompts))], latent_shape(path, 64, 64))

        def render(label: str) -> tuple[np.ndarray, float]:
            adapter.use_attention(label)
            started, images = time.perf_counter(), []
            for start in range(0, len(prompts), batch):
                part = {key: value[start:start + batch] for key, value in embeds.items()}
                images.append(adapter.render(part, latents[start:start + batch], steps=STEPS, guidance_scale=5.0,
                                             height=64, width=64))
            return np.concatenate(images), time.perf_counter() - started

        full, full_seconds = render("full")
        full_scores = rater.score(full, prompts)
        score, score_se = mean_se(full_scores)
        rows.append({"model": model, "mode": "full", "density": 1.0, "schedule": "all", "psnr": None,
                     "score": score, "score_se": score_se, "seconds": full_seconds})
        print(f"{model} full: score {score:.3f} ± {score_se:.3f} ({full_seconds:.1f} s)", flush=True)
        for schedule, steps in SCHEDULES.items():
            for density in DENSITIES:
                for mode in MODES:
                    images, seconds = render(AttentionPlan(mode, density, steps).label)
                    scores = rater.score(images, prompts)
                    quality, quality_se = mean_se(psnr(images, full))
                    score, score_se = mean_se(scores)
                    gap, gap_se = mean_se(np.asarray(scores) - np.asarray(full_scores))
                    rows.append({"model": model, "mode": mode, "density": density, "schedule": schedule,
                                 "psnr": quality, "psnr_se": quality_se, "score": score, "score_se": score_se,
                                 "score_gap": gap, "score_gap_se": gap_se, "seconds": seconds})
                    print(f"{model} {schedule} {density} {mode}: PSNR {quality:.1f} ± {quality_se:.1f} dB, score "
                          f"{score:.3f} (gap {gap:+.3f} ± {gap_se:.3f}), {seconds:.1f} s", flush=True)
        adapter.use_attention("full")
    return rows


def best_of(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def kernel(token_counts: list[int], repeats: int) -> list[dict]:
    rows = []
    with torch.inference_mode():
        for tokens in token_counts:
            batch = 2 if tokens <= 4096 else 1  # 16,384 tokens: one image, so the dense call fits in seconds
            query, key, value = (torch.randn(batch, 16, tokens, 72) for _ in range(3))
            block = math.ceil(tokens / min(tokens, SEQUENCE_BLOCKS))
            for density in DENSITIES:
                mask = band_block_mask(math.ceil(tokens / block), density)
                dense, sparse, full = [], [], []
                for _ in range(2):  # interleaved: the machine's drift falls on all three
                    dense.append(best_of(lambda: F.scaled_dot_product_attention(query, key, value), repeats))
                    sparse.append(best_of(lambda: block_sparse_attention(query, key, value, mask, block), repeats))
                    full.append(best_of(lambda: full_step(query, key, value, mask, block), repeats))
                dense_s, sparse_s, full_s = min(dense), min(sparse), min(full)
                full_count = len(SCHEDULES["paper 8/20"])
                average = (full_count * full_s + (STEPS - full_count) * sparse_s) / STEPS
                row = {"tokens": tokens, "batch": batch, "density": density, "block": block,
                       "kept_blocks": int(mask[0, 0].sum()), "dense_ms": 1000 * dense_s, "sparse_ms": 1000 * sparse_s,
                       "full_step_ms": 1000 * full_s, "sparse_over_dense": sparse_s / dense_s,
                       "full_step_over_dense": full_s / dense_s, "schedule_average_over_dense": average / dense_s}
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def render_times(prompts: list[str], repeats: int) -> dict:
    """A whole render of the testbed DiT, full against Re-ttention at 0.031 (paper schedule); and one forward of a
    random-weight PixArt-XL-width transformer at 4,096 tokens, a full step against a sparse one."""
    from diffusers import PixArtTransformer2DModel

    result = {}
    path = resolve_model("embedded:shapes-dit")
    adapter = diffusion.load_adapter(path, "full")
    embeds = adapter.encode(prompts, 5.0)
    embeds.pop("truncated", None)
    latents = batch_noise(list(range(len(prompts))), latent_shape(path, 64, 64))
    label = AttentionPlan("re-ttention", 0.031, paper_full_steps(STEPS)).label
    times = {"full": [], label: []}
    for _ in range(repeats):
        for name in times:
            adapter.use_attention(name)
            started = time.perf_counter()
            adapter.render(embeds, latents, steps=STEPS, guidance_scale=5.0, height=64, width=64)
            times[name].append(time.perf_counter() - started)
    adapter.use_attention("full")
    result["testbed_dit"] = {"images": len(prompts), "full_s": min(times["full"]), "re_ttention_s": min(times[label]),
                             "ratio": min(times[label]) / min(times["full"])}
    print(json.dumps(result["testbed_dit"]), flush=True)
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(sample_size=128, num_layers=2, patch_size=2, attention_head_dim=72,
                                           num_attention_heads=16, caption_channels=4096, in_channels=4,
                                           out_channels=8, cross_attention_dim=1152, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False,
                                           norm_eps=1e-6).eval()
    clock = StepClock(AttentionPlan("re-ttention", 0.031, (0,)))
    processors = {name: SparseSelfAttention(clock) if name.endswith("attn1.processor") else processor
                  for name, processor in transformer.attn_processors.items()}
    stock = dict(transformer.attn_processors)
    x = torch.randn(2, 4, 128, 128)
    context, mask = torch.randn(2, 120, 4096), torch.ones(2, 120, dtype=torch.long)
    timestep = torch.tensor([500, 500])
    # PixArt-alpha at 1024 px (sample size 128) is conditioned on the image size and aspect ratio.
    added = {"resolution": torch.tensor([[1024.0, 1024.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}

    def forward():
        transformer(x, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=timestep,
                    added_cond_kwargs=added, return_dict=False)

    with torch.inference_mode():
        dense, full_step, sparse = [], [], []
        for _ in range(repeats):
            transformer.set_attn_processor(dict(stock))
            dense.append(best_of(forward, 1))
            transformer.set_attn_processor(dict(processors))
            clock.step = 0
            full_step.append(best_of(forward, 1))
            clock.step = 1
            sparse.append(best_of(forward, 1))
    row = {"tokens": 4096, "blocks": 2, "dense_s": min(dense), "re_ttention_full_step_s": min(full_step),
           "sparse_step_s": min(sparse), "sparse_over_dense": min(sparse) / min(dense),
           "full_step_over_dense": min(full_step) / min(dense)}
    full_count = len(paper_full_steps(STEPS))
    row["schedule_average_over_dense"] = (full_count * row["full_step_over_dense"]
                                          + (STEPS - full_count) * row["sparse_over_dense"]) / STEPS
    result["pixart_xl_width_forward"] = row
    print(json.dumps(row), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["fidelity", "kernel", "render"])
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts for the fidelity part")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="the fidelity part's models")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [line.strip() for line in (ROOT / "examples" / "shapes-held-out.txt").read_text().splitlines()
               if line.strip()][:args.prompts]
    started = time.time()
    results: dict = {"settings": {"steps": STEPS, "schedules": {k: list(v) for k, v in SCHEDULES.items()},
                                  "prompts": len(prompts), "threads": args.threads, "torch": torch.__version__}}
    parts = {"fidelity": lambda: fidelity(prompts, args.batch, args.models),
             "kernel": lambda: kernel(args.tokens, args.repeats), "render": lambda: render_times(prompts[:16],
                                                                                                  args.repeats)}
    for name in args.parts:
        with torch.inference_mode():
            results[name] = parts[name]()
        results["wall_seconds"] = time.time() - started
        if args.json:  # after each part: a later part's failure keeps what was measured
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
