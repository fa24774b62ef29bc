"""The pipeline families seedsift renders, and what a pipeline folder's JSON configs say about one of them.

Family, latent shape, native image size, text-embedding width and solver labels are read from configs only: no
weights, no torch and no model library, so the driver plans and checks a run in a fraction of a second before Ray
starts (start-up time). `actors/models/diffusion.py` holds the adapter that renders each family.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from actors.models.solvers import SCHEDULE_PREFIX, SCHEDULERS


@dataclass(frozen=True)
class Family:
    """One pipeline family: the diffusers pipeline classes it covers and the names of its components."""

    name: str  # what predictors and manifests record: "sd", "sdxl", "pixart"
    pipeline_classes: tuple[str, ...]
    denoiser_name: str = "unet"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    tokenizer_names: tuple[str, ...] = ("tokenizer",)
    patched: bool = False  # the denoiser cuts the latent into patch_size x patch_size tiles


SD = Family("sd", ("StableDiffusionPipeline",))
SDXL = Family("sdxl", ("StableDiffusionXLPipeline",), text_encoder_names=("text_encoder", "text_encoder_2"),
              tokenizer_names=("tokenizer", "tokenizer_2"))
PIXART = Family("pixart", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), denoiser_name="transformer", patched=True)
FAMILIES = {family.name: family for family in (SD, SDXL, PIXART)}
FAMILY_BY_PIPELINE = {name: family for family in FAMILIES.values() for name in family.pipeline_classes}

# Every embedding array an adapter's encode can return; they travel in the row from the scorer to the generator.
EMBEDDING_KEYS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_attention_mask",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)
# Both pipelines' `check_inputs` reject image sizes that are not multiples of 8.
PIPELINE_SIZE_MULTIPLE = 8
# Solvers whose state between steps is the latent alone (plus a step counter): a denoising of several images can be
# narrowed to some of them mid-way and continue exactly. Multistep solvers (DPM++, UniPC, PNDM) keep earlier model
# outputs of the whole batch, so they cannot.
RESUMABLE_SOLVERS = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")


def read_config(model_path: str, subfolder: str | None = None) -> dict[str, Any]:
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


def family_of_class(class_name: str, where: str) -> Family:
    """The family of a diffusers pipeline class name; ValueError naming `where` it was read for an unknown one."""
    family = FAMILY_BY_PIPELINE.get(class_name)
    if family is None:
        raise ValueError(f"{where}: pipeline class {class_name!r} is not supported (supported: "
                         f"{', '.join(FAMILY_BY_PIPELINE)})")
    return family


def family_of(model_path: str) -> Family:
    """The family of a pipeline folder or hub id, from its model_index.json."""
    return family_of_class(read_config(model_path).get("_class_name", "<missing _class_name>"),
                           f"{model_path}/model_index.json")


def vae_scale_factor(model_path: str) -> int:
    return 2 ** (len(read_config(model_path, "vae")["block_out_channels"]) - 1)


def latent_shape(model_path: str, height: int, width: int) -> tuple[int, int, int]:
    """(channels, height / f, width / f) of one image's initial noise, f the VAE scale factor; configs only."""
    family = family_of(model_path)
    denoiser = read_config(model_path, family.denoiser_name)
    scale_factor = vae_scale_factor(model_path)
    multiple = scale_factor * (int(denoiser.get("patch_size") or 1) if family.patched else 1)
    multiple = math.lcm(multiple, PIPELINE_SIZE_MULTIPLE)
    if height % multiple or width % multiple:
        raise ValueError(
            f"{model_path}: image size {height}x{width} is not a multiple of {multiple} "
            f"(needed by this {family.name} pipeline); pick height and width divisible by {multiple}"
        )
    return (int(denoiser["in_channels"]), height // scale_factor, width // scale_factor)


def default_image_size(model_path: str) -> tuple[int, int]:
    """(width, height) the pipeline was trained at: the denoiser's sample size times the VAE scale factor."""
    sample = read_config(model_path, family_of(model_path).denoiser_name)["sample_size"]
    sample = sample if isinstance(sample, (list, tuple)) else (sample, sample)
    scale_factor = vae_scale_factor(model_path)
    return int(sample[1]) * scale_factor, int(sample[0]) * scale_factor


def text_embedding_dim(model_path: str) -> int:
    """Width of the token embeddings the denoiser sees (CLIP hidden_size, T5 d_model, summed for SDXL); configs only."""
    width = 0
    for component in family_of(model_path).text_encoder_names:
        config = read_config(model_path, component)
        width += int(config.get("hidden_size") or config["d_model"])
    return width


def model_identity(model_path: str) -> dict[str, str]:
    """Pipeline, scheduler and denoiser class names of a pipeline folder: small and JSON-able, for manifests."""
    index = read_config(model_path)
    family = family_of(model_path)
    denoiser_entry = index.get(family.denoiser_name) or [None, None]
    scheduler_entry = index.get("scheduler") or [None, None]
    return {
        "family": family.name,
        "pipeline": index["_class_name"],
        "scheduler": scheduler_entry[1],
        "denoiser": denoiser_entry[1],
    }


def scheduler_label(model_path: str, scheduler: str = "default") -> str:
    """What manifests record as the scheduler: the pipeline's own class for "default", else the chosen name."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler {scheduler!r} is unknown; use one of {', '.join(SCHEDULERS)}")
    return model_identity(model_path)["scheduler"] if scheduler == "default" else scheduler


def solver_class_name(model_path: str, scheduler: str = "default") -> str:
    """The diffusers class a --scheduler name stands for with this pipeline (its own for "default")."""
    return model_identity(model_path)["scheduler"] if scheduler == "default" else SCHEDULERS[scheduler][0]


def check_resumable_solver(model_path: str, scheduler: str = "default") -> None:
    """ValueError unless this solver can be paused after some steps and continued for some of the images (what
    the preview policy does): the solvers of RESUMABLE_SOLVERS."""
    solver = solver_class_name(model_path, scheduler)
    if solver not in RESUMABLE_SOLVERS:
        raise ValueError(f"{solver} cannot pause a denoising and continue the best preview (it keeps earlier steps "
                         "of the whole batch); use --scheduler ddim, euler or euler-a")


def scheduler_from_label(model_path: str, label: str) -> str:
    """The --scheduler name that rebuilds a recorded label (a name, or the pipeline's own class for "default")."""
    if label in SCHEDULERS:
        return label
    if label.startswith(SCHEDULE_PREFIX):
        raise ValueError(f"the rows were rendered with a searched solver schedule ({label}); it is read from the "
                         "run's run.json (see solver_schedule_for)")
    own = model_identity(model_path)["scheduler"]
    if label == own:
        return "default"
    raise ValueError(f"the rows were rendered with scheduler {label}, but {model_path} now ships {own}; the model "
                     "folder changed since the run")
