"""GPU check: `seedsift generate` against a plain diffusers fp16 loop on full-size SD 1.5 and SDXL, on one GPU.

Builds random-weight SD 1.5 and SDXL pipelines from their published configs (offline: no hub; a byte-level
tokenizer stands in for CLIP's BPE, which changes no cost that matters), then runs bench_overhead's interleaved
comparison on each (same prompts, seeds, size, steps and batch; the images match) while `nvidia-smi` samples the
GPU: images/s ratio, time to the first image, GPU utilisation while rendering, peak GPU memory. Then the sparse
self-attention timings of issue 22 (attention_check: the kernel at 4,096 and 16,384 tokens in bf16, a random-weight
PixArt-XL transformer forward, full against sparse step).

    bash benchmarks/gpu_check.sh            # on a GPU machine: about 6-8 minutes on one H200
    bash benchmarks/gpu_check.sh --smoke    # CPU, tiny configs of the same builders: what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import _common  # noqa: F401  (puts the repository on sys.path)
import bench_overhead
from _common import LoadSampler, machine, save, table

# Published configs (stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 unet/vae/text_encoder config.json),
# written out: random weights, so only the shapes, and with them the cost, are real.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
}
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
       "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
       "up_block_types": ["UpDecoderBlock2D"] * 4}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu"}
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
             "hidden_act": "gelu", "projection_dim": 1280}
# The smoke mode's tiny configs: the same builders, at the sizes the test suite's tiny pipelines have.
TINY_UNET = {"sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "norm_num_groups": 4,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [16, 32],
             "attention_head_dim": 4}
TINY_VAE = {**VAE, "block_out_channels": [8, 8], "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
TINY_CLIP = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}

# family -> size, steps, images, and the configs at full size and in the smoke mode
RUNS = {
    "sd15": {"size": 512, "steps": 20, "images": 32, "batch": 4},
    "sdxl": {"size": 1024, "steps": 20, "images": 16, "batch": 2},
}
SMOKE_RUNS = {"sd15": {"size": 64, "steps": 2, "images": 12, "batch": 4},
              "sdxl": {"size": 64, "steps": 2, "images": 12, "batch": 4}}


def build_pipeline(family: str, folder: str, smoke: bool) -> None:
    """A random-weight pipeline of `family` saved into `folder` (fp16 on a GPU, fp32 in the smoke mode)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from actors.models.embedded import SD_NOISE_SCHEDULE, _tiny_clip_tokenizer

    tokenizer = _tiny_clip_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer), "max_position_embeddings": 77}
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.float16
    torch.manual_seed(0)
    with torch.device(device):  # full-size weights are drawn on the GPU: seconds instead of minutes
        vae = AutoencoderKL(**(TINY_VAE if smoke else VAE))
        if family == "sd15":
            text = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if smoke else CLIP_L), **ids))
            unet = UNet2DConditionModel(**(TINY_UNET if smoke else SD15_UNET) | {
                "cross_attention_dim": text.config.hidden_size})
            pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                           scheduler=DDIMScheduler(**SD_NOISE_SCHEDULE, clip_sample=False,
                                                                   set_alpha_to_one=False),
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            text = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if smoke else CLIP_L), **ids))
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
                **(TINY_CLIP | {"projection_dim": 16} if smoke else CLIP_BIGG), **ids))
            config = SDXL_UNET
            if smoke:  # the tiny UNet with SDXL's extra conditioning, sized to the tiny encoders
                config = TINY_UNET | {"use_linear_projection": True, "addition_embed_type": "text_time",
                                      "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 16}
            unet = UNet2DConditionModel(**config | {
                "cross_attention_dim": text.config.hidden_size + text_2.config.hidden_size})
            pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text, text_encoder_2=text_2,
                                             tokenizer=tokenizer, tokenizer_2=tokenizer,
                                             scheduler=EulerDiscreteScheduler(**SD_NOISE_SCHEDULE))
    pipe.to(dtype=dtype)
    pipe.save_pretrained(folder)
    del pipe
    if not smoke:
        torch.cuda.empty_cache()


class GpuSampler:
    """`nvidia-smi` every 200 ms while one side runs: GPU utilisation and memory, with their times."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []  # (perf_counter, utilisation %, memory MiB)
        self._process = None
        self._thread = None

    def __enter__(self) -> GpuSampler:
        self.started = time.perf_counter()
        self._process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            try:
                utilisation, memory = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.perf_counter() - self.started, utilisation, memory))

    def __exit__(self, *exc) -> None:
        self._process.terminate()
        self._process.wait()
        self._thread.join(timeout=5)

    def summary(self, first_image: float, last_image: float) -> dict:
        """Utilisation while images were coming (first to last), and the peak memory of the whole run."""
        window = [u for t, u, _ in self.samples if first_image <= t <= last_image] or [0.0]
        return {"GPU util % (rendering)": sum(window) / len(window),
                "peak GPU MiB": max((m for *_, m in self.samples), default=0.0)}


def warm_caches() -> float:
    """Import torch, diffusers, transformers and Ray and start CUDA once in a throwaway process, so that what the
    first process on a fresh machine pays once (libraries read from disk, CUDA's first start) falls on neither side
    of the first comparison. On the one H200 run it took 25 s, and the plain loop's imports still took 15.7 s after
    it: there the imports themselves are slow, not only their first reading."""
    started = time.perf_counter()
    code = ("import torch, diffusers, transformers, ray, ray.data; "
            "x = torch.ones(1, 4, 8, 8, device='cuda', dtype=torch.float16); "  # cuDNN's conv and cuBLAS's matmul
            "torch.nn.functional.conv2d(x, torch.ones(4, 4, 3, 3, device='cuda', dtype=x.dtype), padding=1) @ x")
    subprocess.run([bench_overhead.PYTHON, "-c", code], check=True)
    took = time.perf_counter() - started
    print(f"gpu_check: caches warmed in {took:.1f} s", flush=True)
    return took


def attention_check(smoke: bool) -> list[dict]:
    """Issue 22 on the GPU: one self-attention call in PixArt-XL's layout (16 heads of 72, batch 2, bf16) at 4,096
    and 16,384 tokens, dense SDPA against the block-sparse kernel (flex_attention with a BlockMask, compiled) at
    3.1 % density, and Re-ttention's full step; then a random-weight PixArt-XL transformer (28 blocks, 1024 px:
    4,096 tokens) forward with stock attention, a Re-ttention full step and a sparse step. Smoke: CPU, float32, tiny."""
    import torch
    import torch.nn.functional as F
    from diffusers import PixArtTransformer2DModel

    from actors.models.attention import SEQUENCE_BLOCKS, SparseSelfAttention, StepClock, full_step
    from actors.models.attention_plan import AttentionPlan
    from actors.models.sparse_attention import band_block_mask, block_sparse_attention

    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)

    def timed(function, repeats: int = 5) -> float:
        function()  # warm-up: compiles flex_attention for this shape
        if device == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            function()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return min(times)

    rows = []
    with torch.inference_mode():
        for tokens in ((256,) if smoke else (4096, 16384)):
            q, k, v = (torch.randn(2, 16, tokens, 72, device=device, dtype=dtype) for _ in range(3))
            block = -(-tokens // min(tokens, SEQUENCE_BLOCKS))
            mask = band_block_mask(-(-tokens // block), 0.031)
            dense = timed(lambda: F.scaled_dot_product_attention(q, k, v))
            sparse = timed(lambda: block_sparse_attention(q, k, v, mask, block))
            full = timed(lambda: full_step(q, k, v, mask, block))
            rows.append({"what": f"attention call, {tokens} tokens", "dense ms": 1000 * dense,
                         "sparse step ms": 1000 * sparse, "re-ttention full step ms": 1000 * full,
                         "sparse / dense": sparse / dense})
            print(json.dumps(rows[-1]), flush=True)
        size = {"sample_size": 8, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                "caption_channels": 32, "cross_attention_dim": 16} if smoke else {
            "sample_size": 128, "num_layers": 28, "attention_head_dim": 72, "num_attention_heads": 16,
            "caption_channels": 4096, "cross_attention_dim": 1152}
        torch.manual_seed(0)
        transformer = PixArtTransformer2DModel(patch_size=2, in_channels=4, out_channels=8, attention_bias=True,
                                               activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                               norm_type="ada_norm_single", norm_elementwise_affine=False,
                                               norm_eps=1e-6, **size).to(device, dtype).eval()
        stock = dict(transformer.attn_processors)
        clock = StepClock(AttentionPlan("re-ttention", 0.031, (0,)))
        sparse_processors = {name: SparseSelfAttention(clock) if name.endswith("attn1.processor") else processor
                             for name, processor in stock.items()}
        latent = size["sample_size"]
        x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
        context = torch.randn(2, 120, size["caption_channels"], device=device, dtype=dtype)
        text_mask = torch.ones(2, 120, device=device, dtype=torch.long)
        timestep = torch.tensor([500, 500], device=device)

        # PixArt-alpha at 1024 px (sample size 128) is conditioned on the image size and aspect ratio.
        added = {"resolution": torch.tensor([[1024.0, 1024.0]] * 2, device=device, dtype=dtype),
                 "aspect_ratio": torch.tensor([[1.0]] * 2, device=device, dtype=dtype)}

        def forward():
            transformer(x, encoder_hidden_states=context, encoder_attention_mask=text_mask, timestep=timestep,
                        added_cond_kwargs=added, return_dict=False)

        transformer.set_attn_processor(dict(stock))
        dense = timed(forward, 3)
        transformer.set_attn_processor(dict(sparse_processors))
        clock.step = 0
        full = timed(forward, 3)
        clock.step = 1
        sparse = timed(forward, 3)
        rows.append({"what": f"PixArt transformer forward, {(latent // 2) ** 2} tokens", "dense ms": 1000 * dense,
                     "sparse step ms": 1000 * sparse, "re-ttention full step ms": 1000 * full,
                     "sparse / dense": sparse / dense})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny configs: checks the script, measures nothing")
    parser.add_argument("--families", nargs="*", default=list(RUNS), choices=list(RUNS),
                        help="pipelines to compare (none: only the sparse-attention timings)")
    parser.add_argument("--name", default=None, help="results/NAME.json and .md (default: gpu-check[-smoke])")
    parser.add_argument("--results", default=None, help="folder for NAME.json and .md (default: benchmarks/results)")
    parser.add_argument("--address", default=None, help="Ray for the seedsift side to join (default: its own)")
    parser.add_argument("--no-attention", action="store_true", help="skip the sparse-attention timings (issue 22)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    if not smoke and shutil.which("nvidia-smi") is None:
        print("gpu_check: no nvidia-smi here; on a machine without a GPU run it with --smoke", file=sys.stderr)
        return 2
    rows, raw, breakdowns = [], [], {}
    start_machine = machine()
    warm_up_s = warm_caches() if not smoke and args.families else None
    with LoadSampler() as load, tempfile.TemporaryDirectory(prefix="seedsift-gpu-check-") as tmp:
        for family in args.families:
            settings = (SMOKE_RUNS if smoke else RUNS)[family]
            folder = os.path.join(tmp, family)
            started = time.perf_counter()
            build_pipeline(family, folder, smoke)
            build_s = time.perf_counter() - started
            options = SimpleNamespace(batch_size=settings["batch"], guidance=7.5, generator_cpus=0,
                                      device="cpu" if smoke else "cuda")
            work = os.path.join(tmp, f"{family}-run")
            os.makedirs(work)
            result = bench_overhead.compare(folder, settings["size"], settings["steps"], settings["images"], options,
                                            work, sampler=None if smoke else (lambda side: GpuSampler()),
                                            address=args.address)
            row = {"pipeline": family, "batch": settings["batch"], "build s": build_s, **result["row"]}
            row["images/s ratio"] = row["marginal ratio"]
            row["plain peak allocated GiB"] = result["raw"]["plain"].get("peak_gpu_memory_gb")
            rows.append(row)
            raw.append(result["raw"])
            breakdowns[f"{family}, {settings['size']}x{settings['size']}"] = result["breakdown"]
            print(json.dumps(row), flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    attention = [] if args.no_attention else attention_check(smoke)
    columns = ["pipeline", "size", "steps", "images", "batch", "build s", "plain first image s",
               "seedsift first image s", "plain s/img", "seedsift s/img", "images/s ratio", "plain fixed s",
               "seedsift fixed s", "plain GPU util % (rendering)", "seedsift GPU util % (rendering)",
               "plain peak GPU MiB", "seedsift peak GPU MiB", "plain peak allocated GiB", "identical images"]
    text = ("GPU check" + (" (smoke: CPU, tiny configs; measures nothing)" if smoke else "")
            + f": seedsift generate vs a plain diffusers {'fp32' if smoke else 'fp16'} loop, random-weight "
            f"pipelines from the published configs; load {load.summary()}")
    if rows:  # none when only the attention timings ran
        text += "\n\n" + table(rows, columns) + bench_overhead.breakdown_text(breakdowns)
    if attention:
        text += ("\n\nSparse self-attention (issue 22), Re-ttention at density 0.031, "
                 + ("float32 on CPU" if smoke else "bf16") + ":\n\n"
                 + table(attention, ["what", "dense ms", "sparse step ms", "re-ttention full step ms",
                                     "sparse / dense"]))
    save(args.name or ("gpu-check-smoke" if smoke else "gpu-check"),
         {"args": {**vars(args), "results": None},  # the folder is a path of the machine it ran on
          "machine_at_start": start_machine, "warm_up_s": warm_up_s, "rows": rows, "raw": raw, "attention": attention},
         text,
         Path(args.results) if args.results else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
