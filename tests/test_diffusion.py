"""Tests for the embedded tiny pipelines and the model-family adapters (load, encode, render).

No Ray: plain functions on tiny random-weight pipelines, 64x64 images and a few steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from actors.models import diffusion, embedded, families
from actors.models.seeds import batch_noise

# Two threads match the measured recipes; more only adds contention on these 2-core machines.
torch.set_num_threads(2)

SIZE = 64
STEPS = 3
GUIDANCE = 4.0
PROMPTS = ["a photo of a cat", "Ünïcödé prompt 日本語 🐱"]
LONG_PROMPT = "a very long prompt " * 40
FAMILIES = ["sd", "sdxl", "pixart"]
DENOISER_WEIGHTS = {
    "sd": "unet/diffusion_pytorch_model.safetensors",
    "sdxl": "unet/diffusion_pytorch_model.safetensors",
    "pixart": "transformer/diffusion_pytorch_model.safetensors",
}
# Token-embedding width the denoiser sees: SDXL concatenates its two 32-wide CLIP encoders.
EMBED_WIDTH = {"sd": 32, "sdxl": 64, "pixart": 32}


@pytest.fixture(scope="module")
def model_paths(tiny_sd_path: str, tiny_sdxl_path: str, tiny_pixart_path: str) -> dict[str, str]:
    return {"sd": tiny_sd_path, "sdxl": tiny_sdxl_path, "pixart": tiny_pixart_path}


@pytest.fixture(scope="module")
def adapters(model_paths: dict[str, str]) -> dict[tuple[str, str], diffusion.PipelineAdapter]:
    """Every (family, part) pipeline in its adapter, loaded once for the module."""
    return {
        (family, part): diffusion.load_adapter(model_paths[family], part)
        for family in FAMILIES
        for part in diffusion.PARTS
    }


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().clip(0, 255).astype(np.uint8)


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# --- embedded builds -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic_and_leaves_caller_rng_alone(family, model_paths, tmp_path):
    builder = {"sd": embedded.build_tiny_sd, "sdxl": embedded.build_tiny_sdxl, "pixart": embedded.build_tiny_pixart}[family]
    rng_before = torch.get_rng_state()
    builder(str(tmp_path / "again"))
    assert torch.equal(rng_before, torch.get_rng_state())

    vae_weights = "vae/diffusion_pytorch_model.safetensors"
    text_weights = [f"{name}/model.safetensors" for name in families.FAMILIES[family].text_encoder_names]
    for weights in (DENOISER_WEIGHTS[family], vae_weights, *text_weights):
        first = load_file(os.path.join(model_paths[family], weights))
        second = load_file(str(tmp_path / "again" / weights))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first), weights
    # The T5 vocabulary is trained at build time, so it must come out the same too.
    first_tokenizer = Path(model_paths[family], "tokenizer", "tokenizer.json").read_text()
    assert first_tokenizer == (tmp_path / "again" / "tokenizer" / "tokenizer.json").read_text()


def test_clip_tokenizer_round_trips_and_handles_any_text(tiny_sd_path):
    from transformers import CLIPTextConfig, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(tiny_sd_path, "tokenizer"))
    assert len(tokenizer) == 514
    assert tokenizer.model_max_length == 77
    assert CLIPTextConfig.from_pretrained(os.path.join(tiny_sd_path, "text_encoder")).vocab_size == len(tokenizer)
    text = "Ünïcödé prompt 日本語 🐱, with punctuation!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    # CLIP lowercases and splits punctuation into its own word; byte-level symbols keep everything else.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ünïcödé prompt 日本語 🐱, with punctuation !"
    assert embedded._tiny_clip_tokenizer()(text).input_ids == ids


def test_t5_tokenizer_round_trips(tiny_pixart_path):
    from transformers import T5Config, T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(os.path.join(tiny_pixart_path, "tokenizer"))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert T5Config.from_pretrained(os.path.join(tiny_pixart_path, "text_encoder")).vocab_size == len(tokenizer)
    for text in ["a painting of a squirrel eating a burger", "Ünïcödé 日本語 🐱"]:
        ids = tokenizer(text).input_ids
        assert ids[-1] == tokenizer.eos_token_id and len(ids) > 1
        assert ids == embedded._tiny_t5_tokenizer()(text).input_ids
    plain = "a painting of a squirrel eating a burger"
    assert tokenizer.decode(tokenizer(plain).input_ids, skip_special_tokens=True) == plain


def test_resolve_model_passes_other_strings_through():
    assert embedded.resolve_model("/data/models/my-sd") == "/data/models/my-sd"
    assert embedded.resolve_model("org/some-model") == "org/some-model"
    with pytest.raises(ValueError, match="embedded:tiny-sd"):
        embedded.resolve_model("embedded:nope")


def test_resolve_model_builds_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEEDSIFT_CACHE", str(tmp_path))
    builds = []

    def fake_build(folder: str) -> None:
        builds.append(folder)
        Path(folder, "model_index.json").write_text("{}")

    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake", fake_build)
    path = embedded.resolve_model("embedded:fake")
    assert path == str(tmp_path / "models" / "fake-v1")
    assert embedded.resolve_model("embedded:fake") == path
    assert len(builds) == 1
    assert sorted(os.listdir(tmp_path / "models")) == ["fake-v1"]


def test_resolve_model_losing_the_race_keeps_the_winner(tmp_path, monkeypatch):
    monkeypatch.setenv("SEEDSIFT_CACHE", str(tmp_path))
    target = tmp_path / "models" / "fake-v1"

    def build_while_another_node_wins(folder: str) -> None:
        # Another process finishes first and renames its complete copy into place.
        target.mkdir(parents=True)
        (target / "model_index.json").write_text('{"winner": true}')
        Path(folder, "model_index.json").write_text('{"winner": false}')

    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake", build_while_another_node_wins)
    assert embedded.resolve_model("embedded:fake") == str(target)
    assert json.loads((target / "model_index.json").read_text()) == {"winner": True}
    assert sorted(os.listdir(tmp_path / "models")) == ["fake-v1"]


def test_resolve_model_builds_a_real_embedded_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("SEEDSIFT_CACHE", str(tmp_path))
    path = embedded.resolve_model("embedded:tiny-pixart")
    assert path == str(tmp_path / "models" / "tiny-pixart-v1")
    assert diffusion.pipeline_family(path) == "pixart"


# --- adapters --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_family_from_folder_and_object(family, model_paths, adapters):
    assert diffusion.pipeline_family(model_paths[family]) == family
    assert diffusion.pipeline_family(adapters[(family, "render")].pipe) == family


def test_pipeline_family_rejects_unknown_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="KandinskyPipeline"):
        diffusion.pipeline_family(str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_shape_matches_pipeline_prepare_latents(family, model_paths, adapters):
    shape = families.latent_shape(model_paths[family], SIZE, SIZE)
    assert shape == (4, 32, 32)
    pipe = adapters[(family, "full")].pipe
    made = pipe.prepare_latents(1, shape[0], SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert tuple(made.shape) == (1, *shape)
    assert families.latent_shape(model_paths[family], 64, 128) == (4, 32, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_shape_rejects_indivisible_sizes(family, model_paths):
    with pytest.raises(ValueError, match="multiple of 8"):
        families.latent_shape(model_paths[family], 60, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_adapter_parts_skip_components(family, adapters):
    components = families.FAMILIES[family]
    denoiser = components.denoiser_name
    text_side = components.text_encoder_names + components.tokenizer_names
    text = adapters[(family, "text")].pipe
    assert all(getattr(text, name) is not None for name in text_side)
    assert getattr(text, denoiser) is None and text.vae is None
    render = adapters[(family, "render")]
    assert all(getattr(render.pipe, name) is None for name in text_side)
    assert getattr(render.pipe, denoiser) is not None and render.pipe.vae is not None
    with pytest.raises(ValueError, match="part"):
        diffusion.load_adapter("unused", "everything")
    with pytest.raises(ValueError, match="part='text'"):
        render.encode(PROMPTS, GUIDANCE)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_identity_is_small_and_json_able(family, model_paths):
    identity = families.model_identity(model_paths[family])
    assert json.loads(json.dumps(identity)) == identity
    expected = {
        "sd": ("StableDiffusionPipeline", "DDIMScheduler", "UNet2DConditionModel"),
        "sdxl": ("StableDiffusionXLPipeline", "EulerDiscreteScheduler", "UNet2DConditionModel"),
        "pixart": ("PixArtAlphaPipeline", "DPMSolverMultistepScheduler", "PixArtTransformer2DModel"),
    }[family]
    assert (identity["pipeline"], identity["scheduler"], identity["denoiser"]) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_prompts_shapes_and_truncation(family, model_paths, adapters):
    text = adapters[(family, "text")]
    tokens = {"sd": 77, "sdxl": 77, "pixart": 120}[family]
    width = EMBED_WIDTH[family]
    assert families.text_embedding_dim(model_paths[family]) == width
    guided = text.encode(PROMPTS + [LONG_PROMPT], GUIDANCE)
    assert guided["prompt_embeds"].shape == (3, tokens, width)
    assert guided["prompt_embeds"].dtype == np.float32
    assert guided["negative_prompt_embeds"].shape == (3, tokens, width)
    assert guided["truncated"].tolist() == [False, False, True]
    if family == "pixart":
        for key in ("prompt_attention_mask", "negative_prompt_attention_mask"):
            assert guided[key].shape == (3, tokens) and guided[key].dtype == np.int64
        assert guided["prompt_attention_mask"][2].all() and not guided["prompt_attention_mask"][0].all()
    if family == "sdxl":
        # The second encoder's projection: one pooled vector per prompt, conditioning the UNet with the image size.
        for key in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds"):
            assert guided[key].shape == (3, 32) and guided[key].dtype == np.float32
        # force_zeros_for_empty_prompt: an unset negative prompt is all zeros, as in a plain pipeline call.
        assert not guided["negative_prompt_embeds"].any() and not guided["negative_pooled_prompt_embeds"].any()
    assert set(guided) - {"truncated"} <= set(families.EMBEDDING_KEYS)

    unguided = text.encode(PROMPTS, 1.0)
    assert not [key for key in unguided if key.startswith("negative_")]
    np.testing.assert_array_equal(unguided["prompt_embeds"], guided["prompt_embeds"][:2])


@pytest.mark.parametrize("guidance", [1.0, GUIDANCE])
@pytest.mark.parametrize("family", FAMILIES)
def test_render_from_embeds_matches_plain_prompt_call(family, guidance, model_paths, adapters):
    latents = batch_noise([11, 12], families.latent_shape(model_paths[family], SIZE, SIZE))
    embeds = adapters[(family, "text")].encode(PROMPTS, guidance)
    images = adapters[(family, "render")].render(
        embeds, latents, steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE
    )
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert images.std() > 1.0  # not a blank image

    extra = {"use_resolution_binning": False, "clean_caption": False} if family == "pixart" else {}
    reference = adapters[(family, "full")].pipe(
        prompt=PROMPTS,
        latents=latents,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        output_type="np",
        **extra,
    ).images
    assert max_level_difference(images, to_uint8(reference)) <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_render_is_repeatable_and_batch_independent(family, model_paths, adapters):
    render = adapters[(family, "render")]
    latents = batch_noise([21, 22], families.latent_shape(model_paths[family], SIZE, SIZE))
    embeds = adapters[(family, "text")].encode(PROMPTS, GUIDANCE)
    settings = {"steps": STEPS, "guidance_scale": GUIDANCE, "height": SIZE, "width": SIZE}

    first = render.render(embeds, latents, **settings)
    np.testing.assert_array_equal(first, render.render(embeds, latents, **settings))
    for row in range(2):
        alone = {key: value[row : row + 1] for key, value in embeds.items()}
        single = render.render(alone, latents[row : row + 1], **settings)
        # Batch size 1 takes another kernel path: one uint8 level is the measured worst case.
        assert max_level_difference(first[row : row + 1], single) <= 1
    # Different seeds give different images: the latents, not the prompt alone, drive the result.
    other = render.render(embeds, batch_noise([31, 32], latents.shape[1:]), **settings)
    assert max_level_difference(first, other) > 1


def test_render_without_negative_embeds_explains_the_fix(model_paths, adapters):
    embeds = adapters[("sd", "text")].encode(PROMPTS, 1.0)
    latents = batch_noise([1, 2], families.latent_shape(model_paths["sd"], SIZE, SIZE))
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        adapters[("sd", "render")].render(embeds, latents, steps=1, guidance_scale=GUIDANCE, height=SIZE, width=SIZE)


def test_pixart_sigma_uses_the_pixart_adapter_with_its_longer_context(tiny_pixart_path, tmp_path):
    """PixArt-Sigma shares PixArt-alpha's call signature; only its T5 context (300 tokens) differs."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    alpha = PixArtAlphaPipeline.from_pretrained(tiny_pixart_path)
    folder = str(tmp_path / "tiny-pixart-sigma")
    PixArtSigmaPipeline(tokenizer=alpha.tokenizer, text_encoder=alpha.text_encoder, vae=alpha.vae,
                        transformer=alpha.transformer, scheduler=alpha.scheduler).save_pretrained(folder)
    assert diffusion.pipeline_family(folder) == "pixart"
    full = diffusion.load_adapter(folder, "full")
    render_only = diffusion.load_adapter(folder, "render")
    embeds = full.encode(["a lighthouse", "a fox"], 2.0)
    assert embeds["prompt_embeds"].shape[1] == 300 and not embeds["truncated"].any()
    embeds.pop("truncated")
    latents = batch_noise([1, 2], families.latent_shape(folder, 64, 64))
    images = render_only.render(embeds, latents, steps=2, guidance_scale=2.0, height=64, width=64)
    plain = full.pipe(prompt=["a lighthouse", "a fox"], latents=latents.clone(), num_inference_steps=2, guidance_scale=2.0,
                 height=64, width=64, output_type="np", use_resolution_binning=False, clean_caption=False).images
    assert images.shape == (2, 64, 64, 3)
    assert np.abs(images.astype(int) - (plain * 255).round().clip(0, 255).astype(int)).max() <= 1


# --- solvers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", [name for name in diffusion.SCHEDULERS if name != "default"])
@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_each_named_solver_renders_repeatably_from_the_pipelines_own_schedule(family, scheduler, model_paths, adapters):
    path = model_paths[family]
    render = diffusion.load_adapter(path, "render", scheduler=scheduler)
    class_name, options = diffusion.SCHEDULERS[scheduler]
    assert type(render.pipe.scheduler).__name__ == class_name
    for key, value in options.items():
        assert render.pipe.scheduler.config[key] == value
    own = adapters[(family, "render")].pipe.scheduler.config
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert render.pipe.scheduler.config[key] == own[key], key  # the model's noise schedule is kept
    embeds = adapters[(family, "text")].encode(PROMPTS, GUIDANCE)
    seeds = [41, 42]
    latents = batch_noise(seeds, families.latent_shape(path, SIZE, SIZE))
    settings = {"steps": STEPS, "guidance_scale": GUIDANCE, "height": SIZE, "width": SIZE}
    first = render.render(embeds, latents, seeds=seeds, **settings)
    again = diffusion.load_adapter(path, "render", scheduler=scheduler)  # as reproduce does, in a fresh load
    single = again.render({k: v[1:] for k, v in embeds.items()}, latents[1:], seeds=seeds[1:], **settings)
    assert max_level_difference(first[1:], single) <= 1  # stochastic solvers too: step noise comes from the seed
    default = adapters[(family, "render")].render(embeds, latents, **settings)
    same_solver = class_name == type(adapters[(family, "render")].pipe.scheduler).__name__ and scheduler != "dpm++-karras"
    assert (max_level_difference(first, default) == 0) == same_solver  # a new solver draws another image
    assert families.scheduler_label(path, scheduler) == scheduler
    assert families.scheduler_from_label(path, families.scheduler_label(path, "default")) == "default"
