"""The `embedded:shapes-dit` model: a PixArt-layout diffusion transformer trained here on the shapes world.

Same world, captions, VAE and rater as `embedded:shapes` (the VAE is the shipped one, reused as it is), with a
PixArt transformer (adaLN-single, cross-attention to a small T5 encoder trained with it) in place of the UNet. It
exists so that sparse attention (issue 22, Re-ttention) is measured where self-attention has learned structure:
tiny-pixart's random weights only test the wiring. 64x64 images have a 16x16 latent; with patch size 2 every
self-attention layer sees 64 tokens (an 8x8 grid, row by row), as the UNet's 8x8 level does. Patch size 1 (256
tokens) measured 1.3 s per training step against 0.3 s on one core: 4x the hour this machine can give it.

Built by `python -m jobs.train_shapes --denoiser dit` (scripts/train_shapes_dit.sh installs it in
actors/testbed/weights/pipeline-dit).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from actors.testbed import model as unet_model
from actors.testbed.model import TrainSettings


TRANSFORMER = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,  # the noise only; no learned variance
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 24,
    "cross_attention_dim": 96,
    "caption_channels": 64,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
}
T5 = {"d_model": 64, "d_kv": 16, "d_ff": 256, "num_layers": 3, "num_heads": 4, "relative_attention_num_buckets": 16,
      "dropout_rate": 0.0, "feed_forward_proj": "gated-gelu"}


def build_transformer():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**TRANSFORMER)


def build_t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id, **T5)
    return T5EncoderModel(config)


class DiTDenoiser:
    """The parts `model.train_denoiser` trains for the DiT: a transformer and a T5 encoder, and one prediction."""

    name = "transformer"

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id

    def build(self, tokenizer):
        return build_transformer().train(), build_t5_encoder(tokenizer).train()

    def predict(self, denoiser, text_encoder, noisy, timesteps, ids):
        mask = (ids != self.pad_id).long()
        context = text_encoder(ids, attention_mask=mask)[0]
        return denoiser(noisy, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=timesteps,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def assemble_pipeline(vae, transformer, text_encoder, tokenizer):
    """A PixArtAlphaPipeline around the trained parts, with DDIM from the training noise schedule."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                               transformer=transformer.eval(), scheduler=DDIMScheduler(**unet_model.SCHEDULER))


def train_shapes_dit(out: str | Path, settings: TrainSettings, vae_folder: str | Path,
                     log: Callable[[dict], None] | None = None, checkpoints: str | Path | None = None,
                     checkpoint_every: int = 0) -> dict:
    """Train the transformer and its T5 encoder on the latents of the shipped shapes VAE; save to `out`."""
    from diffusers import AutoencoderKL

    torch.set_num_threads(settings.threads)
    records, record = unet_model.training_log(log)
    started, cpu_started = time.time(), time.process_time()
    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    for param in vae.parameters():
        param.requires_grad_(False)

    def save_checkpoint(step, ema_transformer, ema_text, tokenizer, scaling_factor) -> None:
        folder = Path(checkpoints) / f"step-{step}"
        assemble_pipeline(vae, ema_transformer, ema_text, tokenizer).save_pretrained(folder)
        record({"stage": "checkpoint", "step": step, "folder": str(folder)})

    # The VAE keeps its own scaling factor: the latents the transformer learns are the UNet's, scaled the same way.
    transformer, text_encoder, tokenizer, _, denoiser_stats = unet_model.train_denoiser(
        vae, settings, record, checkpoint=save_checkpoint if checkpoints else None, checkpoint_every=checkpoint_every,
        parts=DiTDenoiser, scaling_factor=vae.config.scaling_factor)
    pipe = assemble_pipeline(vae, transformer, text_encoder, tokenizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    vae_config = out / "vae" / "config.json"  # loaded from a folder, the VAE would record that folder's path
    vae_config.write_text(json.dumps({k: v for k, v in json.loads(vae_config.read_text()).items()
                                      if k != "_name_or_path"}, indent=2) + "\n")
    summary = {
        "settings": asdict(settings),
        "vae": "the shipped embedded:shapes VAE, unchanged",
        "parameters": {"transformer": unet_model.parameter_count(transformer),
                       "text_encoder": unet_model.parameter_count(text_encoder)},
        "denoiser": denoiser_stats,
        "total_seconds": time.time() - started,
        "total_cpu_seconds": time.process_time() - cpu_started,
        "torch": torch.__version__,
        "log": records,
    }
    summary["folder_bytes"] = unet_model.folder_size(out)
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
