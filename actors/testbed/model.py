"""The `embedded:shapes` model: a small Stable-Diffusion-layout pipeline trained here on procedural shape scenes.

Built by jobs/train_shapes.py (the VAE first, then the UNet and the text encoder together on its latents); the
trained folder ships in actors/testbed/weights/pipeline and actors.models.embedded resolves `embedded:shapes` to it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from actors.testbed import world as shapes

logger = logging.getLogger("seedsift.shapes")

# Word-level vocabulary: the special tokens first (fixed ids), then every word of the shapes grammar.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
GRAMMAR_WORDS = (
    tuple(shapes.COUNT_WORDS) + tuple(shapes.COLOURS) + shapes.SHAPES + tuple(shapes.PLURALS.values())
    + ("and", "to", "the", "left", "right", "of", "above", "below")
)
MAX_TOKENS = 16  # the longest caption (a relation) has 10 words + <bos> + <eos>

TEXT_ENCODER = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4}
VAE = {
    "block_out_channels": (8, 16, 32),  # three levels: scale factor 4, a 64x64 image has a 16x16x4 latent
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": shapes.IMAGE_SIZE,
    # No attention: the VAE is then purely convolutional, so it can be trained on crops (see VAE_CROP).
    "mid_block_add_attention": False,
}
VAE_CROP = 32  # the VAE trains on random 32x32 crops: a quarter of the compute per image, same edges and colours
UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 4,  # diffusers reads this as the number of heads
    "norm_num_groups": 16,
    "cross_attention_dim": TEXT_ENCODER["hidden_size"],
}
# DDPM's linear schedule: its last step leaves almost no signal (alpha_bar = 4e-5), so sampling from pure noise
# matches training; "trailing" spacing makes a 20-step DDIM run start at t = 999.
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
}
SCHEDULER = {
    **NOISE_SCHEDULE,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "trailing",
    "steps_offset": 1,  # unused by "trailing" spacing; 1 keeps diffusers from warning about old configs
}


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run depends on; the same settings and thread count give the same weights.

    The defaults reproduce the shipped model: the EMA weights after 4500 denoiser steps of a 6000-step learning-rate
    schedule (the training length was chosen from that run's checkpoints, see docs/shapes.md).
    """

    seed: int = 0
    # One thread: on a shared 2-core machine a second OpenMP thread mostly spins (measured 2x slower per step).
    threads: int = 1
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_learning_rate: float = 2e-3
    # Per latent element, against a per-pixel squared error. 1e-6 (SD's weight) gave a near-plain autoencoder
    # (posterior std 0.02) whose decoder turned small denoiser errors into textured backgrounds; 2e-4 keeps the
    # posterior std near a tenth of the latent spread at the same reconstruction error.
    kl_weight: float = 2e-4
    latent_scenes: int = 30000  # scenes encoded once for denoiser training (posterior mean and std kept)
    denoiser_steps: int = 4500  # steps actually run
    # Length of the warm-up + cosine learning-rate schedule. Stopping before its end (denoiser_steps below it) is how
    # the shipped model was made; set both equal for a run that decays fully.
    denoiser_schedule_steps: int = 6000
    batch: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1  # share of captions replaced by "" so classifier-free guidance works
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023) for faster convergence
    log_every: int = 250

    def __post_init__(self) -> None:
        if self.denoiser_schedule_steps < self.denoiser_steps:
            raise ValueError(f"TrainSettings: denoiser_schedule_steps {self.denoiser_schedule_steps} is below "
                             f"denoiser_steps {self.denoiser_steps}; the schedule must cover every step run "
                             f"(raise --denoiser-schedule-steps)")


def build_tokenizer():
    """Word-level tokenizer for the shapes grammar: <bos> words <eos>, padded with <pad>, unknown words -> <unk>."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + GRAMMAR_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # A full stop is dropped (the grammar allows a trailing one); case never matters.
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\."), " ")]
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        layer_norm_eps=1e-5,
        **TEXT_ENCODER,
    )
    return CLIPTextModel(config)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, **VAE)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], the range Stable Diffusion's VAE works in."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as StableDiffusionPipeline.encode_prompt makes them (padded to model_max_length)."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def draw_batch(rng: np.random.Generator, count: int, templates: dict[str, list[str]]) -> tuple[np.ndarray, list[str]]:
    batch = [shapes.draw_scene(shapes.random_prompt(rng, templates=templates), rng) for _ in range(count)]
    return np.stack([scene.image for scene in batch]), [scene.caption for scene in batch]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_vae(settings: TrainSettings, log: Callable[[dict], None]) -> tuple[torch.nn.Module, dict]:
    """AutoencoderKL trained on endless train-split scenes: squared error plus a tiny KL term."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng([settings.seed, 1])
    templates = shapes.split_prompts("train")
    vae = build_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, settings.warmup_steps, settings.vae_steps)
    )
    started, cpu_started = time.time(), time.process_time()
    recent: list[float] = []
    for step in range(settings.vae_steps):
        images, _ = draw_batch(rng, settings.vae_batch, templates)
        top, left = (int(v) for v in rng.integers(0, shapes.IMAGE_SIZE - VAE_CROP + 1, size=2))
        pixels = images_to_tensor(images[:, top : top + VAE_CROP, left : left + VAE_CROP])
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        squared_error = (reconstruction - pixels).pow(2).mean()
        kl = posterior.kl().mean() / np.prod(posterior.mean.shape[1:])
        loss = squared_error + settings.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent.append(float(squared_error.detach()))
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.vae_steps:
            log({"stage": "vae", "step": step + 1, "mse": float(np.mean(recent)), "seconds": time.time() - started})
            recent = []
    vae.eval()
    # Held-out figure: reconstruction error on fresh held-out scenes, in 0..255 levels.
    eval_rng = np.random.default_rng([settings.seed, 2])
    images, _ = draw_batch(eval_rng, 64, shapes.split_prompts("held_out"))
    with torch.no_grad():
        decoded = vae.decode(vae.encode(images_to_tensor(images)).latent_dist.mode()).sample
    levels = (decoded.clamp(-1, 1).add(1).mul(127.5) - torch.from_numpy(images).permute(0, 3, 1, 2).float()).abs()
    stats = {"seconds": time.time() - started, "cpu_seconds": time.process_time() - cpu_started,
             "held_out_mean_abs_error_levels": float(levels.mean())}
    return vae, stats


@torch.no_grad()
def encode_scenes(vae, settings: TrainSettings, log: Callable[[dict], None]):
    """(posterior means, posterior stds, captions) of `latent_scenes` fresh train-split scenes."""
    rng = np.random.default_rng([settings.seed, 3])
    templates = shapes.split_prompts("train")
    means, stds, captions = [], [], []
    started = time.time()
    for start in range(0, settings.latent_scenes, 256):
        images, prompts = draw_batch(rng, min(256, settings.latent_scenes - start), templates)
        posterior = vae.encode(images_to_tensor(images)).latent_dist
        means.append(posterior.mean.half())
        stds.append(posterior.std.half())
        captions += prompts
    log({"stage": "encode", "scenes": len(captions), "seconds": time.time() - started})
    return torch.cat(means), torch.cat(stds), captions


class UNetDenoiser:
    """The parts `train_denoiser` trains for `embedded:shapes`: a UNet and a CLIP text encoder, and one prediction.
    (actors/testbed/dit.py has the transformer's.)"""

    name = "unet"

    def __init__(self, tokenizer):
        pass

    def build(self, tokenizer):
        return build_unet().train(), build_text_encoder(tokenizer).train()

    def predict(self, denoiser, text_encoder, noisy, timesteps, ids):
        return denoiser(noisy, timesteps, text_encoder(ids)[0]).sample


def train_denoiser(vae, settings: TrainSettings, log: Callable[[dict], None], checkpoint: Callable | None = None,
                   checkpoint_every: int = 0, parts=UNetDenoiser, scaling_factor: float | None = None):
    """A denoiser and its text encoder (`parts`: UNet and CLIP by default) trained together on the VAE's latents;
    returns their EMA copies and stats. `scaling_factor` None measures the latents' scale (a new VAE).

    `checkpoint(step, ema_unet, ema_text_encoder, tokenizer, scaling_factor)` is called every `checkpoint_every`
    steps when given: how the training length was tuned without retraining from scratch.
    """
    from diffusers import DDPMScheduler

    cpu_started = time.process_time()
    means, stds, captions = encode_scenes(vae, settings, log)
    # SD's recipe: scale latents to unit variance so the noise schedule's signal-to-noise ratios mean what they say.
    torch.manual_seed(settings.seed)
    probe = means[:4096].float() + stds[:4096].float() * torch.randn(means[:4096].shape)
    if scaling_factor is None:
        scaling_factor = float(1.0 / probe.std())
    tokenizer = build_tokenizer()
    token_ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    torch.manual_seed(settings.seed + 1)
    model_parts = parts(tokenizer)
    unet, text_encoder = model_parts.build(tokenizer)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=1e-2)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, settings.warmup_steps, settings.denoiser_schedule_steps)
    )
    noise_schedule = DDPMScheduler(**NOISE_SCHEDULE)
    alphas_cumprod = noise_schedule.alphas_cumprod
    generator = torch.Generator().manual_seed(settings.seed + 2)
    started = time.time()
    recent: list[float] = []
    for step in range(settings.denoiser_steps):
        index = torch.randint(0, len(captions), (settings.batch,), generator=generator)
        latents = means[index].float() + stds[index].float() * torch.randn(
            (settings.batch, *means.shape[1:]), generator=generator
        )
        latents = latents * scaling_factor
        ids = token_ids[index].clone()
        dropped = torch.rand(settings.batch, generator=generator) < settings.prompt_dropout
        ids[dropped] = empty_ids
        timesteps = torch.randint(0, NOISE_SCHEDULE["num_train_timesteps"], (settings.batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        predicted = model_parts.predict(unet, text_encoder, noisy, timesteps, ids)
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
        weight = torch.clamp(snr, max=settings.min_snr_gamma) / snr
        per_sample = (predicted - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_schedule.step()
        # EMA with a warm-up, so the early average is not dominated by the random initialisation.
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_model, model in ((ema_unet, unet), (ema_text, text_encoder)):
                for ema_param, param in zip(ema_model.parameters(), model.parameters()):
                    ema_param.lerp_(param, 1.0 - decay)
        recent.append(float(per_sample.detach().mean()))
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.denoiser_steps:
            log({"stage": "denoiser", "step": step + 1, "eps_mse": float(np.mean(recent)),
                 "seconds": time.time() - started})
            recent = []
        if checkpoint and checkpoint_every and (step + 1) % checkpoint_every == 0:
            checkpoint(step + 1, ema_unet, ema_text, tokenizer, scaling_factor)
    stats = {"seconds": time.time() - started, "cpu_seconds": time.process_time() - cpu_started,
             "scaling_factor": scaling_factor}
    return ema_unet, ema_text, tokenizer, scaling_factor, stats


def assemble_pipeline(vae, unet, text_encoder, tokenizer, scaling_factor: float):
    """A StableDiffusionPipeline around the trained parts, with DDIM from the training noise schedule."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling_factor)
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def folder_size(folder: str | Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def training_log(log: Callable[[dict], None] | None) -> tuple[list[dict], Callable[[dict], None]]:
    """The entries of a training run (kept for training.json) and the function that records one: to `log`, or to
    this module's logger as JSON."""
    records: list[dict] = []

    def record(entry: dict) -> None:
        records.append(entry)
        (log or (lambda e: logger.info(json.dumps(e))))(entry)

    return records, record


def train_shapes_model(out: str | Path, settings: TrainSettings, log: Callable[[dict], None] | None = None,
                       checkpoints: str | Path | None = None, checkpoint_every: int = 0) -> dict:
    """Train the whole pipeline and save it to `out` (safetensors) with training.json; returns that record.

    With `checkpoints`, the EMA pipeline is also saved there as step-N every `checkpoint_every` denoiser steps.
    """
    torch.set_num_threads(settings.threads)
    records, record = training_log(log)
    started, cpu_started = time.time(), time.process_time()
    vae, vae_stats = train_vae(settings, record)
    for param in vae.parameters():
        param.requires_grad_(False)
    def save_checkpoint(step, ema_unet, ema_text, tokenizer, scaling_factor) -> None:
        folder = Path(checkpoints) / f"step-{step}"
        assemble_pipeline(vae, ema_unet, ema_text, tokenizer, scaling_factor).save_pretrained(folder)
        record({"stage": "checkpoint", "step": step, "folder": str(folder)})

    unet, text_encoder, tokenizer, scaling_factor, denoiser_stats = train_denoiser(
        vae, settings, record, checkpoint=save_checkpoint if checkpoints else None, checkpoint_every=checkpoint_every
    )
    pipe = assemble_pipeline(vae, unet, text_encoder, tokenizer, scaling_factor)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    summary = {
        "settings": asdict(settings),
        "parameters": {
            "unet": parameter_count(unet),
            "vae": parameter_count(vae),
            "text_encoder": parameter_count(text_encoder),
        },
        "vae": vae_stats,
        "denoiser": denoiser_stats,
        "total_seconds": time.time() - started,
        # CPU time of this process (all threads): what the run costs whatever else shares the machine.
        "total_cpu_seconds": time.process_time() - cpu_started,
        "torch": torch.__version__,
        "log": records,
    }
    summary["folder_bytes"] = folder_size(out)
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
