"""Figure 3, embedding reuse: what the generator saves by taking prompt embeddings from the scorer.

Builds a PixArt-style pipeline whose T5 text encoder is large next to its denoiser (random weights, into a temp
cache), then in separate processes: (a) the full pipeline called with prompt strings, (b) load_pipeline(path,
"render") called with the scorer's embeddings (actors.diffusion.render), (c) the scorer side, load_pipeline(path,
"text") + encode_prompts. Reports load time, peak RSS, per-image time, and the cost of moving embeddings through
Ray's object store (ray.put in the driver, ray.get in a task) per row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import _common  # noqa: F401
from _common import PYTHON, LoadSampler, emit, machine, max_rss_mb, run_child, save, table, vm_rss_mb

T5_LARGEISH = {"d_model": 1024, "d_kv": 64, "d_ff": 2816, "num_layers": 8, "num_heads": 16,
               "feed_forward_proj": "gated-gelu"}
MAX_SEQUENCE_LENGTH = 120  # PixArt-alpha's T5 context (actors.diffusion.PIXART_MAX_SEQUENCE_LENGTH)


def build_pipeline(folder: str) -> None:
    """orchestrator.embedded.build_tiny_pixart with a T5 of d_model 1024 x 8 layers (about 100 M parameters)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from orchestrator.embedded import _tiny_t5_tokenizer, _tiny_vae

    tokenizer = _tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=T5_LARGEISH["d_model"], in_channels=4, cross_attention_dim=24, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id, **T5_LARGEISH))
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=_tiny_vae().eval(),
                               transformer=transformer.eval(), scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder)


def prompts_and_seeds(count: int) -> tuple[list[str], list[int]]:
    from orchestrator.corpus import prompt_id_for
    from orchestrator.seeds import candidate_seeds

    prompts = [f"a watercolor painting of a lighthouse number {i} on a rocky coast at dawn" for i in range(count)]
    return prompts, [candidate_seeds(0, prompt_id_for(p), 1)[0] for p in prompts]


def child(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from actors import diffusion
    from orchestrator.seeds import batch_noise

    rss_start = vm_rss_mb()
    started = time.perf_counter()
    part = {"full": "full", "render": "render", "text": "text"}[args.child]
    pipe = diffusion.load_pipeline(args.model_path, part)
    load_s = time.perf_counter() - started
    rss_loaded = vm_rss_mb()
    prompts, seeds = prompts_and_seeds(args.images)
    shape = diffusion.latent_shape(args.model_path, args.size, args.size)
    times = []
    if args.child == "text":
        embeds = {}
        for start in range(0, len(prompts), args.batch_size):
            t = time.perf_counter()
            out = diffusion.encode_prompts(pipe, prompts[start:start + args.batch_size], args.guidance)
            times.append((time.perf_counter() - t) / len(out["prompt_embeds"]))
            for key, value in out.items():
                embeds.setdefault(key, []).append(value)
        np.savez(args.embeddings, **{k: np.concatenate(v) for k, v in embeds.items()})
    else:
        stored = np.load(args.embeddings) if args.child == "render" else None
        for start in range(0, len(prompts), args.batch_size):
            stop = min(start + args.batch_size, len(prompts))
            latents = batch_noise(seeds[start:stop], shape)
            t = time.perf_counter()
            if args.child == "render":
                embeds = {k: stored[k][start:stop] for k in stored.files if k != "truncated"}
                diffusion.render(pipe, embeds, latents, steps=args.steps, guidance_scale=args.guidance,
                                 height=args.size, width=args.size)
            else:
                pipe(prompt=prompts[start:stop], latents=latents, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, height=args.size, width=args.size, output_type="np",
                     use_resolution_binning=False, clean_caption=False, max_sequence_length=MAX_SEQUENCE_LENGTH)
            times.append((time.perf_counter() - t) / (stop - start))
    steady = times[1:] or times  # the first batch warms up
    emit({"part": part, "load_s": load_s, "rss_start_mb": rss_start, "rss_after_load_mb": rss_loaded,
          "peak_rss_mb": max_rss_mb(), "s_per_image_batches": times, "s_per_image": sum(steady) / len(steady),
          "params": {name: sum(p.numel() for p in module.parameters())
                     for name, module in pipe.components.items() if hasattr(module, "parameters")}})


def transport(rows: int, repeats: int) -> dict:
    """ray.put of a batch of embedding rows in the driver, ray.get in a task on another worker process."""
    import numpy as np
    import ray

    tmp = tempfile.mkdtemp(prefix="seedsift-ray-")
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False)

    @ray.remote(num_cpus=0)
    def fetch(refs):
        t = time.perf_counter()
        value = ray.get(refs[0])
        elapsed = time.perf_counter() - t
        return elapsed, sum(v.nbytes for v in value.values())

    results = {}
    shapes = {"pixart_t5_1024": (MAX_SEQUENCE_LENGTH, T5_LARGEISH["d_model"], True),
              "sd15_clip_l": (77, 768, False)}
    for name, (tokens, dim, masks) in shapes.items():
        batch = {"prompt_embeds": np.random.rand(rows, tokens, dim).astype(np.float32),
                 "negative_prompt_embeds": np.random.rand(rows, tokens, dim).astype(np.float32)}
        if masks:
            batch["prompt_attention_mask"] = np.ones((rows, tokens), dtype=np.int64)
            batch["negative_prompt_attention_mask"] = np.ones((rows, tokens), dtype=np.int64)
        nbytes = sum(v.nbytes for v in batch.values())
        ray.get(fetch.remote([ray.put(batch)]))  # warm up the worker
        puts, gets = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            ref = ray.put(batch)
            puts.append(time.perf_counter() - t)
            elapsed, _ = ray.get(fetch.remote([ref]))
            gets.append(elapsed)
            del ref
        results[name] = {"rows": rows, "bytes_per_row": nbytes // rows, "batch_mb": nbytes / 1e6,
                         "put_s": sorted(puts)[len(puts) // 2], "get_s": sorted(gets)[len(gets) // 2]}
    ray.shutdown()
    return results


def parent(args) -> None:
    start_machine = machine()
    cache = os.path.join(tempfile.gettempdir(), "seedsift-bench", "pixart-t5-1024x8")
    if not os.path.isdir(cache):
        build_pipeline(cache + ".partial")
        os.rename(cache + ".partial", cache)
    common = ["--model-path", cache, "--images", str(args.images), "--batch-size", str(args.batch_size),
              "--steps", str(args.steps), "--size", str(args.size), "--guidance", str(args.guidance),
              "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp, LoadSampler() as load:
        embeddings = os.path.join(tmp, "embeds.npz")
        text, _ = run_child([PYTHON, __file__, "--child", "text", "--embeddings", embeddings] + common)
        full, _ = run_child([PYTHON, __file__, "--child", "full"] + common)
        render, _ = run_child([PYTHON, __file__, "--child", "render", "--embeddings", embeddings] + common)
        moved = transport(args.transport_rows, 5)
    load_summary = load.summary()
    rows = [
        {"process": "(a) full pipeline, prompt= strings", "load s": full["load_s"],
         "RSS after load MB": full["rss_after_load_mb"], "peak RSS MB": full["peak_rss_mb"],
         "s per image": full["s_per_image"]},
        {"process": "(b) render part + scorer's embeddings", "load s": render["load_s"],
         "RSS after load MB": render["rss_after_load_mb"], "peak RSS MB": render["peak_rss_mb"],
         "s per image": render["s_per_image"]},
        {"process": "(c) scorer side: text part + encode_prompts", "load s": text["load_s"],
         "RSS after load MB": text["rss_after_load_mb"], "peak RSS MB": text["peak_rss_mb"],
         "s per image": text["s_per_image"]},
        {"process": "saved by (b) vs (a)", "load s": full["load_s"] - render["load_s"],
         "RSS after load MB": full["rss_after_load_mb"] - render["rss_after_load_mb"],
         "peak RSS MB": full["peak_rss_mb"] - render["peak_rss_mb"],
         "s per image": full["s_per_image"] - render["s_per_image"]},
    ]
    move_rows = [{"embeddings": name, "bytes per row": v["bytes_per_row"], "batch rows": v["rows"],
                  "batch MB": v["batch_mb"], "ray.put s": v["put_s"], "ray.get s (task)": v["get_s"],
                  "ms per row (put+get)": 1e3 * (v["put_s"] + v["get_s"]) / v["rows"]} for name, v in moved.items()]
    params = full["params"]
    text_out = (
        f"Embedding reuse: PixArt-style pipeline, T5 encoder {params.get('text_encoder', 0) / 1e6:.0f} M params "
        f"(d_model {T5_LARGEISH['d_model']}, {T5_LARGEISH['num_layers']} layers), transformer "
        f"{params.get('transformer', 0) / 1e6:.2f} M, {args.size}x{args.size}, {args.steps} steps, guidance "
        f"{args.guidance}, batch {args.batch_size}, {args.threads} torch threads; each row its own process; load avg "
        f"1-min during run {load_summary}\n\n"
        + table(rows, ["process", "load s", "RSS after load MB", "peak RSS MB", "s per image"])
        + f"\n\nPer-image time ratio (b)/(a): {render['s_per_image'] / full['s_per_image']:.3f}\n\n"
        + "Moving embeddings (prompt + negative for CFG, plus PixArt's int64 masks) through Ray's object store:\n\n"
        + table(move_rows, ["embeddings", "bytes per row", "batch rows", "batch MB", "ray.put s", "ray.get s (task)",
                            "ms per row (put+get)"]))
    save("embeddings", {"args": vars(args), "machine_at_start": start_machine, "load_during": load_summary,
                        "full": full, "render": render, "text": text, "transport": moved}, text_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["full", "render", "text"])
    parser.add_argument("--model-path")
    parser.add_argument("--embeddings")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--transport-rows", type=int, default=32, help="rows per batch moved through the object store")
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    sys.exit(main())
