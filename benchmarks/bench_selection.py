"""Figure 2, selection economics: scoring 16 candidate noises vs rendering one image, full-size SD 1.5, on one CPU.

Builds SD 1.5's UNet, VAE and CLIP text encoder from their configs with random weights (no download), times one
forward of each and counts FLOPs with torch.utils.flop_counter.FlopCounterMode, next to the seedsift predictor at
its real size for a 4x64x64 latent (text_dim 768) scoring 16 candidates, noise derivation included.
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
from _common import LoadSampler, machine, save, table
from torch.utils.flop_counter import FlopCounterMode

# Stable Diffusion 1.5's unet/config.json, written out (random weights; only the shapes matter for cost).
SD15_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
# Stable Diffusion 1.5's vae/config.json.
SD15_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "act_fn": "silu", "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# CLIP ViT-L/14 text tower (SD 1.5's text_encoder/config.json).
SD15_TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
TOKENS = 77


def measure(fn, repeats: int) -> dict:
    """FLOPs of one call (counted on the first call, which also warms up), then the best wall time of `repeats`."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.no_grad():
            fn()
        times.append(time.perf_counter() - started)
    return {"flops": int(counter.get_total_flops()), "seconds": min(times), "seconds_all": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls of each model (best is kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from actors.predictor.model import NoiseQualityPredictor, PredictorConfig
    from actors.models.seeds import batch_noise, candidate_seeds

    start_machine = machine()
    results: dict[str, dict] = {}
    with LoadSampler() as load:
        # Predictor first (small); then the big models one at a time, freed before the next.
        predictor = NoiseQualityPredictor(PredictorConfig(latent_shape=(4, 64, 64), text_dim=768)).eval()
        predictor_params = sum(p.numel() for p in predictor.parameters())
        seeds = candidate_seeds(0, "benchmark-prompt", args.candidates)
        tokens = torch.randn(1, TOKENS, 768)
        mask = torch.ones(1, TOKENS)

        def score() -> None:
            noise = batch_noise(seeds, (4, 64, 64))
            predictor(noise, tokens.expand(len(seeds), -1, -1), mask.expand(len(seeds), -1))

        results["predictor"] = measure(score, max(3, args.repeats)) | {"params": predictor_params,
                                                                        "what": f"{args.candidates} candidates"}
        started = time.perf_counter()
        noise_only = [batch_noise(seeds, (4, 64, 64)) for _ in range(5)]
        results["noise_derivation"] = {"seconds": (time.perf_counter() - started) / 5, "flops": 0,
                                       "what": f"batch_noise of {args.candidates} seeds"}
        del noise_only

        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)).eval()
        ids = torch.randint(0, 49408, (2, TOKENS))
        results["text_encoder"] = measure(lambda: text(ids), args.repeats) | {
            "params": sum(p.numel() for p in text.parameters()), "what": "CLIP-L, batch 2 (prompt + negative)"}
        del text

        started = time.perf_counter()
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
        build_s = time.perf_counter() - started
        latents = torch.randn(2, 4, 64, 64)
        context = torch.randn(2, TOKENS, 768)
        timestep = torch.tensor([500, 500])
        results["unet_forward"] = measure(lambda: unet(latents, timestep, encoder_hidden_states=context),
                                          args.repeats) | {"params": sum(p.numel() for p in unet.parameters()),
                                                           "what": "batch 2 (CFG), 4x64x64", "build_s": build_s}
        del unet

        vae = AutoencoderKL(**SD15_VAE_CONFIG).eval()
        one_latent = torch.randn(1, 4, 64, 64)
        results["vae_decode"] = measure(lambda: vae.decode(one_latent), 1) | {
            "params": sum(p.numel() for p in vae.decoder.parameters()) + sum(
                p.numel() for p in vae.post_quant_conv.parameters()), "what": "1 latent -> 512x512"}
        del vae

    unet = results["unet_forward"]
    render = {"seconds": unet["seconds"] * args.steps + results["vae_decode"]["seconds"],
              "flops": unet["flops"] * args.steps + results["vae_decode"]["flops"]}
    render_unet_only = {"seconds": unet["seconds"] * args.steps, "flops": unet["flops"] * args.steps}
    score_all = {"seconds": results["predictor"]["seconds"], "flops": results["predictor"]["flops"]}
    rows = []
    for name, entry in results.items():
        rows.append({"component": name, "what": entry["what"], "params": entry.get("params", ""),
                     "GFLOP per call": entry["flops"] / 1e9, "s per call": entry["seconds"]})
    rows.append({"component": f"render one image = {args.steps} x unet_forward + vae_decode",
                 "what": f"{args.steps} steps x CFG = {2 * args.steps} UNet evals",
                 "GFLOP per call": render["flops"] / 1e9, "s per call": render["seconds"]})
    ratio_rows = [
        {"ratio": f"score {args.candidates} candidates / render 1 image (UNet + VAE)",
         "time": score_all["seconds"] / render["seconds"], "FLOPs": score_all["flops"] / render["flops"]},
        {"ratio": f"score {args.candidates} candidates / render 1 image (UNet only)",
         "time": score_all["seconds"] / render_unet_only["seconds"],
         "FLOPs": score_all["flops"] / render_unet_only["flops"]},
        {"ratio": "text encoder (shared, run once by the scorer) / render 1 image",
         "time": results["text_encoder"]["seconds"] / render["seconds"],
         "FLOPs": results["text_encoder"]["flops"] / render["flops"]},
    ]
    load_summary = load.summary()
    text = (f"Selection economics, SD 1.5 shapes, random weights, {args.threads} torch threads, "
            f"load avg 1-min during run {load_summary}\n\n"
            + table(rows, ["component", "what", "params", "GFLOP per call", "s per call"]) + "\n\n"
            + table(ratio_rows, ["ratio", "time", "FLOPs"]) + "\n\nGoal: scoring 16 candidates < 1% of one render: "
            + ("MET" if ratio_rows[0]["time"] < 0.01 and ratio_rows[0]["FLOPs"] < 0.01 else "NOT MET"))
    save("selection", {"args": vars(args), "machine_at_start": start_machine, "load_during": load_summary,
                       "components": results, "render_one_image": render, "ratios": ratio_rows}, text)


if __name__ == "__main__":
    main()
