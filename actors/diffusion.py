"""Model-family adapters: load, encode prompts and render for Stable Diffusion (1.x/2.x), SDXL and PixArt pipelines.

Shared by scorer, generator and reproduce: prompts become embeddings once; renders reuse them with given latents.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

# Pipeline class (model_index.json `_class_name`) -> family; only families whose call signature we know.
FAMILY_BY_PIPELINE = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
}
# The component that denoises latents: its config holds the latent channel count.
DENOISER_BY_FAMILY = {"sd": "unet", "sdxl": "unet", "pixart": "transformer"}
# Text-side components: SDXL has two CLIP encoders whose token embeddings are concatenated along the width.
TEXT_ENCODERS_BY_FAMILY = {
    "sd": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
    "pixart": ("text_encoder",),
}
TOKENIZERS_BY_FAMILY = {"sd": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2"), "pixart": ("tokenizer",)}
# Every embedding array encode_prompts can return; they travel in the row from the scorer to the generator.
EMBEDDING_KEYS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_attention_mask",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)
# T5 context length of each PixArt pipeline (its own default for `max_sequence_length`).
PIXART_MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
# Both pipelines' `check_inputs` reject image sizes that are not multiples of 8.
PIPELINE_SIZE_MULTIPLE = 8
PARTS = ("full", "text", "render")
from actors.solvers import SCHEDULERS, STOCHASTIC_SCHEDULERS  # noqa: E402,F401  (one owner of the names)


def _read_config(model_path: str, subfolder: str | None = None) -> dict[str, Any]:
    """One JSON config of a pipeline folder (or hub id) without loading any weights."""
    if os.path.isdir(model_path):
        parts = [model_path] + ([subfolder, "config.json"] if subfolder else ["model_index.json"])
        with open(os.path.join(*parts), encoding="utf-8") as handle:
            return json.load(handle)
    # A hub id: diffusers' own config loader finds it in the local cache (or downloads the small JSON).
    from diffusers import DiffusionPipeline
    from diffusers.models.modeling_utils import ModelMixin

    if subfolder:
        return dict(ModelMixin.load_config(model_path, subfolder=subfolder))
    return dict(DiffusionPipeline.load_config(model_path))


def _family_of_class(class_name: str, where: str) -> str:
    family = FAMILY_BY_PIPELINE.get(class_name)
    if family is None:
        known = ", ".join(FAMILY_BY_PIPELINE)
        raise ValueError(f"{where}: pipeline class {class_name!r} is not supported (supported: {known})")
    return family


def pipeline_family(path_or_pipe: Any) -> str:
    """Family name ("sd", "sdxl" or "pixart") from a pipeline folder's model_index.json or from a loaded pipeline object."""
    if isinstance(path_or_pipe, (str, os.PathLike)):
        path = os.fspath(path_or_pipe)
        class_name = _read_config(path).get("_class_name", "<missing _class_name>")
        return _family_of_class(class_name, f"{path}/model_index.json")
    return _family_of_class(type(path_or_pipe).__name__, "pipeline object")


def latent_shape(model_path: str, height: int, width: int) -> tuple[int, int, int]:
    """(channels, height / f, width / f) of one image's initial noise, f the VAE scale factor; configs only."""
    family = pipeline_family(model_path)
    denoiser = _read_config(model_path, DENOISER_BY_FAMILY[family])
    vae = _read_config(model_path, "vae")
    scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    multiple = scale_factor
    if family == "pixart":
        # The transformer cuts the latent into patch_size x patch_size tiles.
        multiple *= int(denoiser.get("patch_size") or 1)
    multiple = int(np.lcm(multiple, PIPELINE_SIZE_MULTIPLE))
    if height % multiple or width % multiple:
        raise ValueError(
            f"{model_path}: image size {height}x{width} is not a multiple of {multiple} "
            f"(needed by this {family} pipeline); pick height and width divisible by {multiple}"
        )
    return (int(denoiser["in_channels"]), height // scale_factor, width // scale_factor)


def default_image_size(model_path: str) -> tuple[int, int]:
    """(width, height) the pipeline was trained at: the denoiser's sample size times the VAE scale factor."""
    family = pipeline_family(model_path)
    denoiser = _read_config(model_path, DENOISER_BY_FAMILY[family])
    vae = _read_config(model_path, "vae")
    sample = denoiser["sample_size"]
    sample = sample if isinstance(sample, (list, tuple)) else (sample, sample)
    scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return int(sample[1]) * scale_factor, int(sample[0]) * scale_factor


def text_embedding_dim(model_path: str) -> int:
    """Width of the token embeddings the denoiser sees (CLIP hidden_size, T5 d_model, summed for SDXL); configs only."""
    width = 0
    for component in TEXT_ENCODERS_BY_FAMILY[pipeline_family(model_path)]:
        config = _read_config(model_path, component)
        width += int(config.get("hidden_size") or config["d_model"])
    return width


def scheduler_label(model_path: str, scheduler: str = "default") -> str:
    """What manifests record as the scheduler: the pipeline's own class for "default", else the chosen name."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler {scheduler!r} is unknown; use one of {', '.join(SCHEDULERS)}")
    return model_identity(model_path)["scheduler"] if scheduler == "default" else scheduler


def scheduler_from_label(model_path: str, label: str) -> str:
    """The --scheduler name that rebuilds a recorded label (a name, or the pipeline's own class for "default")."""
    if label in SCHEDULERS:
        return label
    own = model_identity(model_path)["scheduler"]
    if label == own:
        return "default"
    raise ValueError(f"the rows were rendered with scheduler {label}, but {model_path} now ships {own}; the model "
                     "folder changed since the run")


def use_scheduler(pipe, scheduler: str) -> None:
    """Swap the pipeline's solver for a named one, built from the pipeline's own scheduler config."""
    import diffusers

    if scheduler == "default":
        return
    class_name, options = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **options)


def load_pipeline(model_path: str, part: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  scheduler: str = "default"):
    """Load the whole pipeline ("full"), only tokenizer + text encoder ("text"), or all but those ("render"),
    with the named solver (see SCHEDULERS)."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # one bar per actor start is noise in a corpus job's log
    # Its truncation warning prints every dropped token; encode_prompts records truncation in each row instead.
    diffusers_logging.set_verbosity_error()
    if part not in PARTS:
        raise ValueError(f"part {part!r}: unknown (expected one of {', '.join(PARTS)})")
    family = pipeline_family(model_path)
    # Components passed as None are neither loaded nor read from disk.
    skipped: dict[str, None] = {}
    if part == "text":
        skipped = {DENOISER_BY_FAMILY[family]: None, "vae": None}
    elif part == "render":
        skipped = dict.fromkeys(TEXT_ENCODERS_BY_FAMILY[family] + TOKENIZERS_BY_FAMILY[family])
    pipe = DiffusionPipeline.from_pretrained(model_path, dtype=dtype, **skipped)
    use_scheduler(pipe, scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _to_numpy(tensor: torch.Tensor, dtype: type) -> np.ndarray:
    return tensor.detach().to("cpu").numpy().astype(dtype, copy=False)


def _max_text_tokens(pipe, family: str) -> int:
    if family == "pixart":
        return PIXART_MAX_SEQUENCE_LENGTH[type(pipe).__name__]
    return int(pipe.tokenizer.model_max_length)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], guidance_scale: float) -> dict[str, np.ndarray]:
    """Text embeddings of `prompts` (and of the empty negative prompt when guidance_scale > 1), as numpy arrays.

    Keys: prompt_embeds (B,T,D) float32, negative_prompt_embeds when guided, PixArt's int64 attention masks
    (prompt_attention_mask, negative_prompt_attention_mask), SDXL's pooled (B,D2) embeddings
    (pooled_prompt_embeds, negative_pooled_prompt_embeds), and truncated (B,) bool.
    """
    family = pipeline_family(pipe)
    if pipe.text_encoder is None or pipe.tokenizer is None:
        raise ValueError(
            f"encode_prompts: this {type(pipe).__name__} has no text encoder; load it with part='text' or part='full'"
        )
    prompts = list(prompts)
    guided = guidance_scale > 1.0
    device = pipe._execution_device
    out: dict[str, np.ndarray] = {}
    if family == "sd":
        # negative_prompt=None makes the pipeline use "" for every row, as a plain `prompt=` call does.
        embeds, negative = pipe.encode_prompt(prompts, device, 1, guided, negative_prompt=None)
        out["prompt_embeds"] = _to_numpy(embeds, np.float32)
        if guided:
            out["negative_prompt_embeds"] = _to_numpy(negative, np.float32)
    elif family == "sdxl":
        # As in a plain call: no negative prompt, so SDXL's force_zeros_for_empty_prompt decides (zeros by default).
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided, negative_prompt=None
        )
        out["prompt_embeds"] = _to_numpy(embeds, np.float32)
        out["pooled_prompt_embeds"] = _to_numpy(pooled, np.float32)
        if guided:
            out["negative_prompt_embeds"] = _to_numpy(negative, np.float32)
            out["negative_pooled_prompt_embeds"] = _to_numpy(negative_pooled, np.float32)
    else:
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=guided,
            negative_prompt="",
            device=device,
            clean_caption=False,
            max_sequence_length=_max_text_tokens(pipe, family),
        )
        out["prompt_embeds"] = _to_numpy(embeds, np.float32)
        out["prompt_attention_mask"] = _to_numpy(mask, np.int64)
        if guided:
            out["negative_prompt_embeds"] = _to_numpy(negative, np.float32)
            out["negative_prompt_attention_mask"] = _to_numpy(negative_mask, np.int64)
    # Tokenize again without truncation: a prompt longer than the encoder's context lost its tail.
    token_counts = [len(ids) for ids in pipe.tokenizer(prompts, truncation=False, verbose=False).input_ids]
    limit = _max_text_tokens(pipe, family)
    out["truncated"] = np.array([count > limit for count in token_counts], dtype=bool)
    return out


def _denoiser(pipe):
    return getattr(pipe, DENOISER_BY_FAMILY[pipeline_family(pipe)])


def render(
    pipe,
    embeds: dict[str, np.ndarray],
    latents: torch.Tensor,
    *,
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    seeds: list[int] | None = None,
) -> np.ndarray:
    """Images (B,H,W,3) uint8 from precomputed text embeddings and initial latents; needs no text encoder.

    `seeds` (one per image) seed the noise a stochastic solver adds at each step, so such renders are
    reproducible and independent of the batch; deterministic solvers ignore them.
    """
    family = pipeline_family(pipe)
    denoiser = _denoiser(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    guided = guidance_scale > 1.0
    if guided and "negative_prompt_embeds" not in embeds:
        raise ValueError(
            f"guidance_scale {guidance_scale} > 1 needs negative_prompt_embeds; "
            "encode the prompts with the same guidance_scale"
        )

    def tensor(key: str, as_dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(embeds[key])).to(device=device, dtype=as_dtype)

    kwargs: dict[str, Any] = {"prompt_embeds": tensor("prompt_embeds", dtype)}
    if guided:
        kwargs["negative_prompt_embeds"] = tensor("negative_prompt_embeds", dtype)
    if family == "sdxl":
        if "pooled_prompt_embeds" not in embeds:
            raise ValueError("an SDXL render needs pooled_prompt_embeds; encode the prompts with encode_prompts "
                             "on this SDXL pipeline")
        # Size conditioning (add_time_ids) comes from height and width, as in a plain call at that size.
        kwargs["pooled_prompt_embeds"] = tensor("pooled_prompt_embeds", dtype)
        if guided:
            kwargs["negative_pooled_prompt_embeds"] = tensor("negative_pooled_prompt_embeds", dtype)
    if family == "pixart":
        kwargs["prompt_attention_mask"] = tensor("prompt_attention_mask", torch.long)
        if guided:
            kwargs["negative_prompt_attention_mask"] = tensor("negative_prompt_attention_mask", torch.long)
        # The pipeline's default negative_prompt "" clashes with negative_prompt_embeds; None means "use the embeds".
        kwargs.update(
            negative_prompt=None,
            use_resolution_binning=False,
            clean_caption=False,
            max_sequence_length=PIXART_MAX_SEQUENCE_LENGTH[type(pipe).__name__],
        )
    if seeds is not None:
        from orchestrator.seeds import step_noise_generators

        kwargs["generator"] = step_noise_generators(seeds)
    result = pipe(
        latents=latents.to(device=device, dtype=dtype),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        output_type="np",
        **kwargs,
    )
    images = np.asarray(result.images)
    return (images * 255).round().clip(0, 255).astype(np.uint8)


def model_identity(model_path: str) -> dict[str, str]:
    """Pipeline, scheduler and denoiser class names of a pipeline folder: small and JSON-able, for manifests."""
    index = _read_config(model_path)
    family = pipeline_family(model_path)
    denoiser_entry = index.get(DENOISER_BY_FAMILY[family]) or [None, None]
    scheduler_entry = index.get("scheduler") or [None, None]
    return {
        "family": family,
        "pipeline": index["_class_name"],
        "scheduler": scheduler_entry[1],
        "denoiser": denoiser_entry[1],
    }
