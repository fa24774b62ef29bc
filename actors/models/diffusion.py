"""Model-family adapters: one class per pipeline family (Stable Diffusion 1.x/2.x, SDXL, PixArt) with the render
path cut into encode / denoise a step range / decode.

Used by the scorer (encode), the generator (render, or a preview cascade that pauses and resumes a denoising),
reproduce, train and evaluate alike, so an image is assembled in one place whatever stage asks for it.
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from actors.models.families import PIXART, RESUMABLE_SOLVERS, SD, SDXL, Family, family_of, family_of_class
from actors.models.solvers import SCHEDULERS, STOCHASTIC_SCHEDULERS  # noqa: F401  (one owner of the names)

# T5 context length of each PixArt pipeline (its own default for `max_sequence_length`).
PIXART_MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
PARTS = ("full", "text", "render")


def _to_numpy(tensor: torch.Tensor, dtype: type) -> np.ndarray:
    return tensor.detach().to("cpu").numpy().astype(dtype, copy=False)


@dataclass
class Conditioning:
    """What the denoiser reads besides the latent, on its device, already doubled (negative first) when guided."""

    tensors: dict[str, torch.Tensor]
    guidance: float
    guided: bool
    height: int
    width: int

    def rows(self, rows: list[int]) -> Conditioning:
        """The conditioning of some images of the batch (each half, when guided)."""
        count = next(iter(self.tensors.values())).shape[0] // (2 if self.guided else 1)
        index = list(rows) + ([count + r for r in rows] if self.guided else [])
        return replace(self, tensors={k: v[index] for k, v in self.tensors.items()})


@dataclass
class Denoising:
    """A denoising in progress: the latents after `step` of the schedule's steps, and the solver that made them."""

    latents: torch.Tensor
    scheduler: Any  # this denoising's own solver, its timesteps set
    timesteps: torch.Tensor
    step: int
    generators: list | None  # one per image, for solvers that add noise at each step
    predicted_original: torch.Tensor | None = None  # the solver's estimate of the final latent at the last step

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def rows(self, rows: list[int]) -> Denoising:
        """The same denoising narrowed to some of its images, to continue exactly where it stands."""
        name = type(self.scheduler).__name__
        if name not in RESUMABLE_SOLVERS:
            raise ValueError(f"{name} keeps state of the whole batch between steps; a denoising can be narrowed "
                             f"mid-way only with {', '.join(RESUMABLE_SOLVERS)}")
        return replace(self, latents=self.latents[rows],
                       generators=None if self.generators is None else [self.generators[r] for r in rows],
                       predicted_original=None if self.predicted_original is None else self.predicted_original[rows])


class PipelineAdapter:
    """A loaded diffusers pipeline of one family, rendered step by step.

    Subclasses name their family (its components, see actors/models/families.py) and say how the denoiser is called; the
    loop, the solver handling and the decoding are shared. Each family's call mirrors its diffusers pipeline's
    `__call__`, and tests check that a render equals a plain `pipe(prompt=...)` call.
    """

    family: Family

    def __init__(self, pipe):
        self.pipe = pipe
        self.attention_clock = None  # set by use_attention: sparse self-attention's step clock

    def use_attention(self, label: str) -> None:
        """Self-attention as a run's `attention` label says (actors/models/attention.py): "full" leaves the stock
        processors; a sparse mode installs one processor per self-attention layer, stepped by `denoise`."""
        from actors.models.attention import install
        from actors.models.attention_plan import AttentionPlan

        self.attention_clock = install(self.denoiser, AttentionPlan.from_label(label))

    @property
    def denoiser(self):
        return getattr(self.pipe, self.family.denoiser_name)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device if self.denoiser is not None else self.pipe._execution_device

    # ---- 1. text -------------------------------------------------------------------------------------------------

    def max_text_tokens(self) -> int:
        return int(self.pipe.tokenizer.model_max_length)

    @torch.no_grad()
    def encode(self, prompts: list[str], guidance_scale: float) -> dict[str, np.ndarray]:
        """Text embeddings of `prompts` (and of the empty negative prompt when guidance_scale > 1), as numpy arrays.

        Keys: prompt_embeds (B,T,D) float32, negative_prompt_embeds when guided, PixArt's int64 attention masks,
        SDXL's pooled (B,D2) embeddings, and truncated (B,) bool.
        """
        pipe = self.pipe
        if pipe.text_encoder is None or pipe.tokenizer is None:
            raise ValueError(f"encode: this {type(pipe).__name__} has no text encoder; load it with part='text' or "
                             "part='full'")
        prompts = list(prompts)
        out = self._encode(prompts, guidance_scale > 1.0)
        # Tokenize again without truncation: a prompt longer than the encoder's context lost its tail.
        token_counts = [len(ids) for ids in pipe.tokenizer(prompts, truncation=False, verbose=False).input_ids]
        out["truncated"] = np.array([count > self.max_text_tokens() for count in token_counts], dtype=bool)
        return out

    def embed_each(self, prompts: list[str], guidance_scale: float, keys: tuple[str, ...] | None = None,
                   batch: int = 32) -> list[dict[str, np.ndarray]]:
        """One embedding dict per prompt, from `encode` in batches of `batch` prompts: the keys named (all but
        `truncated` when None). What train and evaluate hand the predictor, embedded as the scorer embeds."""
        embeddings = []
        for start in range(0, len(prompts), batch):
            encoded = self.encode(prompts[start:start + batch], guidance_scale)
            encoded.pop("truncated")
            chosen = {key: values for key, values in encoded.items() if keys is None or key in keys}
            count = len(encoded["prompt_embeds"])
            embeddings += [{key: values[i] for key, values in chosen.items()} for i in range(count)]
        return embeddings

    def _encode(self, prompts: list[str], guided: bool) -> dict[str, np.ndarray]:
        # negative_prompt=None makes the pipeline use "" for every row, as a plain `prompt=` call does.
        embeds, negative = self.pipe.encode_prompt(prompts, self.pipe._execution_device, 1, guided, negative_prompt=None)
        out = {"prompt_embeds": _to_numpy(embeds, np.float32)}
        if guided:
            out["negative_prompt_embeds"] = _to_numpy(negative, np.float32)
        return out

    # ---- 2. denoising --------------------------------------------------------------------------------------------

    def conditioning(self, embeds: dict[str, np.ndarray], guidance_scale: float, height: int,
                     width: int) -> Conditioning:
        """The denoiser's inputs from the scorer's embeddings; the text encoder is not needed."""
        guided = self.guided(guidance_scale)
        if guided and "negative_prompt_embeds" not in embeds:
            raise ValueError(f"guidance_scale {guidance_scale} > 1 needs negative_prompt_embeds; encode the prompts "
                             "with the same guidance_scale")
        tensors = {"encoder_hidden_states": self._pair(embeds, "prompt_embeds", guided, self.denoiser.dtype)}
        tensors.update(self._extra_conditioning(embeds, guided, height, width))
        return Conditioning(tensors, guidance_scale, guided, height, width)

    def guided(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0 and getattr(self.denoiser.config, "time_cond_proj_dim", None) is None

    def _pair(self, embeds: dict[str, np.ndarray], key: str, guided: bool, dtype: torch.dtype) -> torch.Tensor:
        """One embedding as a tensor on the denoiser's device, with its negative in front when guided."""
        def tensor(name: str) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(embeds[name])).to(device=self.device, dtype=dtype)

        return torch.cat([tensor("negative_" + key), tensor(key)]) if guided else tensor(key)

    def _extra_conditioning(self, embeds, guided: bool, height: int, width: int) -> dict[str, torch.Tensor]:
        return {}

    def start(self, latents: torch.Tensor, steps: int, seeds: list[int] | None = None) -> Denoising:
        """A denoising of these initial latents (standard normal, as drawn from the seeds) over `steps` steps.

        `seeds` (one per image) seed the noise a stochastic solver adds at each step, so such renders are
        reproducible and independent of the batch; deterministic solvers ignore them.
        """
        scheduler = copy.deepcopy(self.pipe.scheduler)  # its step counter is this denoising's own
        scheduler.set_timesteps(steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        latents = latents.to(device=self.device, dtype=self.denoiser.dtype) * scheduler.init_noise_sigma
        generators = None
        if seeds is not None:
            from actors.models.seeds import step_noise_generators

            generators = step_noise_generators(seeds)
        return Denoising(latents, scheduler, scheduler.timesteps, 0, generators)

    @torch.no_grad()
    def denoise(self, state: Denoising, conditioning: Conditioning, until: int | None = None) -> Denoising:
        """Run the steps from state.step up to `until` (default: the end); no step is ever run twice."""
        until = state.steps if until is None else until
        if not state.step <= until <= state.steps:
            raise ValueError(f"denoise: cannot go from step {state.step} to {until} of {state.steps}")
        scheduler, latents, predicted = state.scheduler, state.latents, state.predicted_original
        options = {}
        parameters = inspect.signature(scheduler.step).parameters
        if "eta" in parameters:
            options["eta"] = 0.0
        if "generator" in parameters:
            options["generator"] = state.generators
        clock = self.attention_clock
        if clock is not None and len(clock.plan.full_steps) and max(clock.plan.full_steps) >= state.steps:
            raise ValueError(f"attention {clock.plan.label} names full steps beyond this denoising's {state.steps}")
        for index, t in enumerate(state.timesteps[state.step:until], start=state.step):
            if clock is not None:
                clock.step = index
            model_input = torch.cat([latents] * 2) if conditioning.guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            prediction = self._predict(model_input, t, conditioning)
            if conditioning.guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + conditioning.guidance * (conditional - unconditional)
            result = scheduler.step(prediction, t, latents, **options, return_dict=True)
            latents = result.prev_sample
            predicted = getattr(result, "pred_original_sample", None)
        return replace(state, latents=latents, step=until, predicted_original=predicted)

    def _predict(self, model_input: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        tensors = dict(conditioning.tensors)
        return self.denoiser(model_input, t, encoder_hidden_states=tensors.pop("encoder_hidden_states"),
                             added_cond_kwargs=tensors or None, return_dict=False)[0]

    # ---- 3. images -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Images (B,H,W,3) uint8 from final (or predicted final) latents."""
        vae = self.pipe.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        images = self.pipe.image_processor.postprocess(images, output_type="np")
        return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)

    def render(self, embeds: dict[str, np.ndarray], latents: torch.Tensor, *, steps: int, guidance_scale: float,
               height: int, width: int, seeds: list[int] | None = None) -> np.ndarray:
        """Images (B,H,W,3) uint8 from precomputed text embeddings and initial latents; needs no text encoder."""
        conditioning = self.conditioning(embeds, guidance_scale, height, width)
        return self.decode(self.denoise(self.start(latents, steps, seeds), conditioning).latents)


class StableDiffusionAdapter(PipelineAdapter):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet reading its token embeddings."""

    family = SD


class StableDiffusionXLAdapter(PipelineAdapter):
    """SDXL: two CLIP encoders whose token embeddings are concatenated along the width, a pooled embedding and the
    size conditioning (add_time_ids) as extra UNet inputs."""

    family = SDXL

    def _encode(self, prompts: list[str], guided: bool) -> dict[str, np.ndarray]:
        # As in a plain call: no negative prompt, so SDXL's force_zeros_for_empty_prompt decides (zeros by default).
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompts, device=self.pipe._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=None)
        out = {"prompt_embeds": _to_numpy(embeds, np.float32), "pooled_prompt_embeds": _to_numpy(pooled, np.float32)}
        if guided:
            out["negative_prompt_embeds"] = _to_numpy(negative, np.float32)
            out["negative_pooled_prompt_embeds"] = _to_numpy(negative_pooled, np.float32)
        return out

    def _extra_conditioning(self, embeds, guided: bool, height: int, width: int) -> dict[str, torch.Tensor]:
        if "pooled_prompt_embeds" not in embeds:
            raise ValueError("an SDXL render needs pooled_prompt_embeds; encode the prompts with this SDXL pipeline's "
                             "adapter")
        dtype = self.denoiser.dtype
        pooled = self._pair(embeds, "pooled_prompt_embeds", guided, dtype)
        # Size conditioning as in a plain call at this size: original = target = (height, width), no crop.
        time_ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype,
                                               text_encoder_projection_dim=int(pooled.shape[-1]))
        return {"text_embeds": pooled, "time_ids": time_ids.to(self.device).repeat(pooled.shape[0], 1)}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # SDXL's VAE overflows in float16
        if upcast:
            vae.to(torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        latents = latents.to(vae.dtype)
        if mean is not None and std is not None:
            view = {"device": latents.device, "dtype": latents.dtype}
            latents = (latents * torch.tensor(std).view(1, -1, 1, 1).to(**view) / vae.config.scaling_factor
                       + torch.tensor(mean).view(1, -1, 1, 1).to(**view))
        else:
            latents = latents / vae.config.scaling_factor
        images = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(torch.float16)
        if getattr(self.pipe, "watermark", None) is not None:
            images = self.pipe.watermark.apply_watermark(images)
        images = self.pipe.image_processor.postprocess(images, output_type="np")
        return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


class PixArtAdapter(PipelineAdapter):
    """PixArt-alpha and -sigma: a T5 encoder with attention masks, a transformer that may predict its variance."""

    family = PIXART

    def max_text_tokens(self) -> int:
        return PIXART_MAX_SEQUENCE_LENGTH[type(self.pipe).__name__]

    def guided(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    def _encode(self, prompts: list[str], guided: bool) -> dict[str, np.ndarray]:
        embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=guided, negative_prompt="", device=self.pipe._execution_device,
            clean_caption=False, max_sequence_length=self.max_text_tokens())
        out = {"prompt_embeds": _to_numpy(embeds, np.float32), "prompt_attention_mask": _to_numpy(mask, np.int64)}
        if guided:
            out["negative_prompt_embeds"] = _to_numpy(negative, np.float32)
            out["negative_prompt_attention_mask"] = _to_numpy(negative_mask, np.int64)
        return out

    def _extra_conditioning(self, embeds, guided: bool, height: int, width: int) -> dict[str, torch.Tensor]:
        mask = self._pair(embeds, "prompt_attention_mask", guided, torch.long)
        extra = {"encoder_attention_mask": mask}
        # PixArt-alpha at 1024 (sample size 128) reads the image size and aspect ratio; every other variant does not.
        if type(self.pipe).__name__ == "PixArtAlphaPipeline" and self.denoiser.config.sample_size == 128:
            dtype = self.denoiser.dtype
            extra["resolution"] = torch.tensor([height, width]).repeat(mask.shape[0], 1).to(self.device, dtype)
            extra["aspect_ratio"] = torch.tensor([float(height / width)]).repeat(mask.shape[0], 1).to(self.device,
                                                                                                       dtype)
        return extra

    def _predict(self, model_input: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        tensors = conditioning.tensors
        added = {"resolution": tensors.get("resolution"), "aspect_ratio": tensors.get("aspect_ratio")}
        timestep = (t[None] if t.dim() == 0 else t).to(model_input.device).expand(model_input.shape[0])
        prediction = self.denoiser(model_input, encoder_hidden_states=tensors["encoder_hidden_states"],
                                   encoder_attention_mask=tensors["encoder_attention_mask"], timestep=timestep,
                                   added_cond_kwargs=added, return_dict=False)[0]
        # A transformer that also predicts the variance (learned sigma) returns twice the channels: keep the noise.
        if self.denoiser.config.out_channels // 2 == model_input.shape[1]:
            prediction = prediction.chunk(2, dim=1)[0]
        return prediction


ADAPTERS: tuple[type[PipelineAdapter], ...] = (StableDiffusionAdapter, StableDiffusionXLAdapter, PixArtAdapter)
ADAPTER_BY_FAMILY = {adapter.family.name: adapter for adapter in ADAPTERS}


def adapter_class(path_or_pipe: Any) -> type[PipelineAdapter]:
    """The adapter for a pipeline folder (from its model_index.json) or for a loaded pipeline object."""
    if isinstance(path_or_pipe, (str, os.PathLike)):
        family = family_of(os.fspath(path_or_pipe))
    else:
        family = family_of_class(type(path_or_pipe).__name__, "pipeline object")
    return ADAPTER_BY_FAMILY[family.name]


def adapter_for(pipe) -> PipelineAdapter:
    """Wrap an already loaded pipeline in its family's adapter."""
    return adapter_class(pipe)(pipe)


def pipeline_family(path_or_pipe: Any) -> str:
    """Family name ("sd", "sdxl" or "pixart") of a pipeline folder or a loaded pipeline object."""
    return adapter_class(path_or_pipe).family.name


def use_scheduler(pipe, scheduler: str, solver_schedule: dict | None = None) -> None:
    """Swap the pipeline's solver for a named one, built from the pipeline's own scheduler config; with
    `solver_schedule` (a schedule file's content) for the unified solver running that schedule."""
    import diffusers

    if solver_schedule is not None:
        from actors.models.unified_solver import ScheduleFile, UnifiedSolverScheduler

        schedule = ScheduleFile.from_dict(solver_schedule).schedule
        pipe.scheduler = UnifiedSolverScheduler.for_pipeline(pipe.scheduler.config, schedule)
        return
    if scheduler == "default":
        return
    class_name, options = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **options)


def device_and_dtype(dtype_name: str = "auto") -> tuple[str, torch.dtype]:
    """cuda with fp16 (or the named dtype) when a GPU is visible to this actor, else cpu with float32."""
    if torch.cuda.is_available():
        names = {"auto": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        return "cuda", names[dtype_name]
    return "cpu", torch.float32


def load_renderer(model_path: str, scheduler: str = "default", solver_schedule: dict | None = None,
                  attention: str = "full") -> PipelineAdapter:
    """The render part of a pipeline on this process's device (cuda fp16 when a GPU is visible, else CPU float32),
    with the named solver and self-attention (an AttentionPlan label): what the generator stage, reproduce and
    evaluate render with, so an image rebuilt anywhere is rendered as the run rendered it."""
    device, dtype = device_and_dtype()
    adapter = load_adapter(model_path, "render", device=device, dtype=dtype, scheduler=scheduler,
                           solver_schedule=solver_schedule)
    adapter.use_attention(attention)
    return adapter


def load_adapter(model_path: str, part: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 scheduler: str = "default", solver_schedule: dict | None = None) -> PipelineAdapter:
    """Load the whole pipeline ("full"), only tokenizer + text encoder ("text"), or all but those ("render"),
    with the named solver (see SCHEDULERS), in its family's adapter."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # one bar per actor start is noise in a corpus job's log
    # Its truncation warning prints every dropped token; encode records truncation in each row instead.
    diffusers_logging.set_verbosity_error()
    if part not in PARTS:
        raise ValueError(f"part {part!r}: unknown (expected one of {', '.join(PARTS)})")
    adapter = adapter_class(model_path)
    # Components passed as None are neither loaded nor read from disk.
    skipped: dict[str, None] = {}
    if part == "text":
        skipped = {adapter.family.denoiser_name: None, "vae": None}
    elif part == "render":
        skipped = dict.fromkeys(adapter.family.text_encoder_names + adapter.family.tokenizer_names)
    pipe = DiffusionPipeline.from_pretrained(model_path, dtype=dtype, **skipped)
    use_scheduler(pipe, scheduler, solver_schedule)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return adapter(pipe)
