"""Embedded default pipelines: tiny Stable Diffusion, SDXL and PixArt pipelines built offline with random weights,
and the shapes pipeline the project trains itself (shipped in actors/testbed/weights/pipeline).

Sits before every model-holding stage: `resolve_model` turns `embedded:NAME` into a local pipeline folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

EMBEDDED_PREFIX = "embedded:"
# Bump when a builder changes so caches built by older code are never reused.
EMBEDDED_VERSION = "v1"
BUILD_SEED = 0

# A small English corpus for the tiny T5 tokenizer: only its statistics matter, not its content.
_T5_TRAINING_TEXT = [
    "a photo of a cat sitting on a red chair",
    "a painting of a squirrel eating a burger",
    "an astronaut riding a horse on the moon",
    "a watercolor landscape with mountains and a lake at sunset",
    "a close up portrait of an old man with a beard, studio lighting",
    "a futuristic city street at night with neon signs and rain",
    "a bowl of fruit on a wooden table, still life, oil painting",
    "two dogs playing in the snow in a park",
    "a small cactus with a happy face in the sahara desert",
    "a sailing boat on the ocean under a cloudy sky",
    "the quick brown fox jumps over the lazy dog",
    "a cozy living room with a fireplace and books on shelves",
    "an illustration of a dragon flying over a castle",
    "a macro photograph of a bee on a yellow flower",
    "a black and white photo of a train station in the 1920s",
]


# The UNet shape both tiny Stable Diffusion pipelines share: two levels, cross-attention at the lower one, and a
# 32x32 latent (64x64 images through the two-level VAE).
TINY_UNET_LAYOUT = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}


# The noise schedule Stable Diffusion 1.x and SDXL were trained with, as their released scheduler configs give it.
SD_NOISE_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character map (each of the 256 bytes gets one symbol)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            # Non-printable bytes are moved past 255 so every symbol is a visible character.
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def _tiny_clip_tokenizer():
    """A 514-token byte-level CLIP tokenizer: no merges, so every character is its own token."""
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _tiny_t5_tokenizer():
    """A small Unigram T5 tokenizer whose pieces are learned here, so no sentencepiece file is needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    special = ["<pad>", "</s>", "<unk>"]  # T5's fixed layout: <pad>=0, </s>=1, <unk>=2.
    trainer = trainers.UnigramTrainer(
        # Above the number of candidate pieces this corpus has (185), so no pruning round decides which survive.
        vocab_size=1000,
        special_tokens=special,
        unk_token="<unk>",
        # Every printable ASCII character is in the vocabulary, so plain English never maps to <unk>.
        initial_alphabet=[chr(c) for c in range(32, 127)],
        show_progress=False,
    )
    backend.train_from_iterator(_T5_TRAINING_TEXT, trainer=trainer)
    # The trainer's piece order and EM scores change from run to run (hash-map order, float sums), which would
    # give every node a different token -> embedding-row mapping. The piece set is stable, so keep only that,
    # in sorted order, with one score for all: segmentation then uses the fewest pieces.
    pieces = sorted(piece for piece, _ in _unigram_vocab(backend) if piece not in special)
    vocab = [(piece, 0.0) for piece in special] + [(piece, -1.0) for piece in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=120)


def _unigram_vocab(backend) -> list[tuple[str, float]]:
    """The (piece, score) list of a trained Unigram model, read from its JSON form (the only public accessor)."""
    model = json.loads(backend.to_str())["model"]
    return [(piece, float(score)) for piece, score in model["vocab"]]


def _tiny_vae():
    """Two-level VAE (scale factor 2): a 64x64 image has a 32x32x4 latent."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        sample_size=64,
    )


def build_tiny_sd(folder: str) -> None:
    """Save a tiny random-weight StableDiffusionPipeline (about 1.4 M UNet parameters) into `folder`."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _tiny_clip_tokenizer()
    # fork_rng keeps the caller's global RNG untouched while the weights come from a fixed seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILD_SEED)
        unet = UNet2DConditionModel(**TINY_UNET_LAYOUT, cross_attention_dim=32, norm_num_groups=2)
        torch.manual_seed(BUILD_SEED)
        vae = _tiny_vae()
        torch.manual_seed(BUILD_SEED)
        text_encoder = CLIPTextModel(_tiny_clip_text_config(tokenizer))
    # Stable Diffusion 1.x's own scheduler settings.
    scheduler = DDIMScheduler(**SD_NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)


def _tiny_clip_text_config(tokenizer, projection_dim: int | None = None):
    """A 2-layer, 32-wide CLIP text encoder config sized for `tokenizer` (with a projection head when asked)."""
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        layer_norm_eps=1e-5,
        max_position_embeddings=77,
        vocab_size=len(tokenizer),
        **extra,
    )


def build_tiny_sdxl(folder: str) -> None:
    """Save a tiny random-weight StableDiffusionXLPipeline (two CLIP encoders, size conditioning) into `folder`."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tiny_clip_tokenizer()
    pooled_width = 32  # text_encoder_2's projection: SDXL's pooled prompt embedding
    time_embed_dim = 8  # per size/crop number; SDXL conditions on six of them
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILD_SEED)
        unet = UNet2DConditionModel(
            **TINY_UNET_LAYOUT,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_width,
            cross_attention_dim=32 + 32,  # both encoders' token embeddings side by side
            norm_num_groups=2,
        )
        torch.manual_seed(BUILD_SEED)
        vae = _tiny_vae()
        torch.manual_seed(BUILD_SEED)
        text_encoder = CLIPTextModel(_tiny_clip_text_config(tokenizer))
        torch.manual_seed(BUILD_SEED + 1)
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_text_config(tokenizer, projection_dim=pooled_width))
    # SDXL base's own scheduler settings.
    scheduler = EulerDiscreteScheduler(**SD_NOISE_SCHEDULE)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)


def build_tiny_pixart(folder: str) -> None:
    """Save a tiny random-weight PixArtAlphaPipeline (diffusers' test transformer, tiny T5) into `folder`."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = _tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILD_SEED)
        # diffusers' unit-test shapes, with sample_size 32 to match the 32x32 latent of a 64x64 image.
        transformer = PixArtTransformer2DModel(
            sample_size=32,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=24,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
        torch.manual_seed(BUILD_SEED)
        vae = _tiny_vae()
        torch.manual_seed(BUILD_SEED)
        text_config = T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            feed_forward_proj="relu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        text_encoder = T5EncoderModel(text_config)
    # PixArt-alpha's released checkpoints ship this scheduler; its defaults are theirs.
    scheduler = DPMSolverMultistepScheduler()
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=scheduler,
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)


# Pipelines trained by the project and shipped inside the package: resolve_model returns their folder as it is.
# Weights the project ships (safetensors plus JSON): the trained testbed's pipeline and predictor, and the tiny
# pipeline's predictor (scripts/train_shapes_model.sh, train_shapes_predictor.sh, train_embedded_predictor.sh).
TESTBED_WEIGHTS = Path(__file__).resolve().parents[1] / "testbed" / "weights"
# shapes-dit: the same world with a PixArt-layout transformer (actors/testbed/dit.py), for sparse attention.
SHIPPED_MODELS = {"shapes": TESTBED_WEIGHTS / "pipeline", "shapes-dit": TESTBED_WEIGHTS / "pipeline-dit"}
EMBEDDED_PREDICTORS = {
    "tiny-sd": Path(__file__).resolve().parent / "predictors" / "tiny-sd-colorfulness",
    "shapes": TESTBED_WEIGHTS / "predictor",
}

# Solver schedules searched for a shipped model (seedsift search-solver, docs/shapes.md): `--scheduler searched`.
SHIPPED_SCHEDULES = {"shapes": {steps: TESTBED_WEIGHTS / "schedules" / f"shapes-{steps}.json" for steps in (4, 6, 8)}}


def shipped_schedule(model: str, steps: int) -> Path:
    """The schedule.json shipped for an embedded model and a step count; ValueError naming what ships."""
    name = model[len(EMBEDDED_PREFIX):] if model.startswith(EMBEDDED_PREFIX) else None
    shipped = SHIPPED_SCHEDULES.get(name)
    if not shipped:
        models = ", ".join(EMBEDDED_PREFIX + n for n in SHIPPED_SCHEDULES)
        raise ValueError(f"searched schedules ship for {models} only; search one for {model} with "
                         "`seedsift search-solver` and pass --scheduler schedule:PATH")
    if steps not in shipped:
        raise ValueError(f"searched schedules ship for {model} at --steps {', '.join(map(str, shipped))}; "
                         f"{steps} steps need a search of their own (seedsift search-solver)")
    return shipped[steps]


# Settings a shipped model was tuned and measured at (docs/shapes.md): the jobs' defaults for flags not given.
SHIPPED_DEFAULTS = {"shapes": {"guidance": 5.0, "rater": "shapes"}, "shapes-dit": {"guidance": 5.0, "rater": "shapes"}}


def model_defaults(model: str) -> dict:
    """Flag defaults that belong to this model (empty for every model but the shipped ones)."""
    return dict(SHIPPED_DEFAULTS.get(model[len(EMBEDDED_PREFIX):], {})) if model.startswith(EMBEDDED_PREFIX) else {}


def _shipped_folder(name: str) -> Path:
    folder = SHIPPED_MODELS[name]
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"model embedded:{name}: {folder} has no model_index.json; the package was installed "
                         f"without its model files, or retrain it with scripts/train_{name.replace('-', '_')}_model.sh")
    return folder


EMBEDDED_MODELS: dict[str, Callable[[str], None]] = {
    "tiny-sd": build_tiny_sd,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-pixart": build_tiny_pixart,
}


def embedded_names() -> list[str]:
    """Every NAME that `embedded:NAME` accepts: the built tiny pipelines, then the shipped trained ones."""
    return [*EMBEDDED_MODELS, *SHIPPED_MODELS]


def cache_root() -> Path:
    """Where built pipelines are kept: `$SEEDSIFT_CACHE` or `~/.cache/seedsift`."""
    return Path(os.environ.get("SEEDSIFT_CACHE") or Path.home() / ".cache" / "seedsift")


def resolve_model(model: str) -> str:
    """Local folder for `embedded:NAME` (built once per node, or shipped); any other model string is unchanged."""
    if not model.startswith(EMBEDDED_PREFIX):
        return model
    name = model[len(EMBEDDED_PREFIX) :]
    if name in SHIPPED_MODELS:
        return str(_shipped_folder(name))
    if name not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + n for n in embedded_names())
        raise ValueError(f"model {model!r}: unknown embedded model {name!r} (known: {known})")
    models_dir = cache_root() / "models"
    target = models_dir / f"{name}-{EMBEDDED_VERSION}"
    if target.is_dir():
        return str(target)
    models_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a rename within one folder is atomic, so readers never see half a build.
    staging = tempfile.mkdtemp(prefix=f".{name}-{EMBEDDED_VERSION}-", dir=models_dir)
    # mkdtemp makes the folder private (0700); the cache is shared, so open it like any other folder.
    os.chmod(staging, 0o755)
    try:
        EMBEDDED_MODELS[name](staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another builder on this node won the race; its copy is identical, so keep theirs.
            if not target.is_dir():
                raise
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)
