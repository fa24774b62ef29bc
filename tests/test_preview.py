"""The preview policy: candidates denoise their first steps, their predicted final images are rated, the best
continues; its image must equal a normal render of its seed, and the manifest records what the previews cost."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from ray.data._internal.arrow_block import ArrowBlockBuilder
from ray.data.block import BlockAccessor

from actors.models import diffusion, families
from actors.models.seeds import batch_noise, candidate_seeds
from actors.raters.specs import make_rater
from actors.rows import SKIPPED
from actors.stages.generator import GeneratorStage, denoise_with_previews
from actors.stages.settings import RenderPlan
from jobs import reproduce
from jobs.verify import verify_output
from orchestrator.flow import pipeline
from orchestrator.run.config import ConfigError, GenerateConfig
from orchestrator.run.plan import build_plan
from tests.helpers_manifest import manifest_frame

STEPS, PREVIEW_STEPS, GUIDANCE, SIZE = 4, 2, 3.0, 64
PROMPTS = ["a red cube on a table", "a lighthouse at dusk", "a bowl of ramen"]


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def text(tiny_sd_path):
    return diffusion.load_adapter(tiny_sd_path, "text")


def scorer_rows(text, prompts: list[str], previewed: int) -> dict[str, np.ndarray]:
    """Rows as the scorer emits them for the preview policy: one per prompt, its candidates in preview_* columns."""
    embeds = text.encode(prompts, GUIDANCE)
    embeds.pop("truncated")
    seeds = np.array([candidate_seeds(0, f"p{i}", previewed) for i in range(len(prompts))], dtype=np.int64)
    count = len(prompts)
    return {"status": np.array(["ok"] * count, dtype=object), "error": np.array([""] * count, dtype=object),
            "prompt": np.array(prompts, dtype=object), "seed": seeds[:, 0].copy(),
            "candidate_index": np.zeros(count, np.int32), "predicted_score": np.full(count, np.nan),
            "preview_seeds": seeds, "preview_candidates": np.tile(np.arange(previewed, dtype=np.int32), (count, 1)),
            "preview_predicted": np.full((count, previewed), np.nan), **embeds}


def test_the_kept_preview_continues_to_the_same_image_as_a_normal_render(tiny_sd_path, text):
    previewed = 3
    plan = RenderPlan(model=tiny_sd_path, steps=STEPS, guidance=GUIDANCE, height=SIZE, width=SIZE,
                      latent_shape=families.latent_shape(tiny_sd_path, SIZE, SIZE), scheduler="default",
                      preview=previewed, preview_steps=PREVIEW_STEPS, rater="colorfulness")
    batch = scorer_rows(text, PROMPTS, previewed)
    stage = GeneratorStage(plan)
    out = stage(batch)
    assert list(out["status"]) == ["ok"] * len(PROMPTS)
    assert "preview_seeds" not in out and "prompt_embeds" not in out
    np.testing.assert_array_equal(out["steps_spent"], previewed * PREVIEW_STEPS + STEPS - PREVIEW_STEPS)
    np.testing.assert_array_equal(out["preview_steps"], PREVIEW_STEPS)

    renderer, rater = diffusion.load_adapter(tiny_sd_path, "render"), make_rater("colorfulness")
    embeds = {k: v for k, v in batch.items() if k in families.EMBEDDING_KEYS}
    for row, prompt in enumerate(PROMPTS):
        seeds = [int(s) for s in batch["preview_seeds"][row]]
        # Each candidate previewed on its own: the same predicted-final-image scores as in the batch.
        alone = {k: np.repeat(v[row:row + 1], previewed, axis=0) for k, v in embeds.items()}
        state = renderer.start(batch_noise(seeds, (4, 32, 32)), STEPS, seeds)
        prompts = [prompt] * previewed
        _, scores = denoise_with_previews(renderer, state, renderer.conditioning(alone, GUIDANCE, SIZE, SIZE),
                                          [PREVIEW_STEPS], lambda images, prompts=prompts: rater.score(images, prompts))
        np.testing.assert_allclose(out["preview_scores"][row], scores[PREVIEW_STEPS], rtol=0, atol=0.05)
        best = int(np.argmax(out["preview_scores"][row]))
        assert out["seed"][row] == seeds[best] and out["candidate_index"][row] == best
        # The continued image equals a normal render of the winning seed (one uint8 level: batch kernels differ).
        normal = renderer.render({k: v[row:row + 1] for k, v in embeds.items()}, batch_noise([seeds[best]], (4, 32, 32)),
                                 steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, seeds=[seeds[best]])
        assert max_level_difference(out["image"][row:row + 1], normal) <= 1
    # The previews see an image already: across candidates their scores differ.
    assert np.ptp(out["preview_scores"], axis=1).min() > 0

    # A batch with nothing to render (a rerun's tallies of committed rows) leaves with the same columns, dtypes and
    # shapes, so Ray Data can merge it with a rendered one: the sink once failed reading such a merge ("buffer is
    # too small for requested array"; the driver-SIGKILL rerun of a preview run, tests/test_faults.py).
    idle = stage({**batch, "status": np.array([SKIPPED] * len(PROMPTS), dtype=object)})
    assert {k: (v.dtype, v.shape[1:]) for k, v in idle.items()} == {k: (v.dtype, v.shape[1:]) for k, v in out.items()}
    assert np.isnan(idle["preview_scores"]).all() and not idle["steps_spent"].any()
    merged = ArrowBlockBuilder()
    for rows in (idle, out):
        merged.add_block(BlockAccessor.batch_to_block(rows))
    np.testing.assert_array_equal(BlockAccessor.for_block(merged.build()).to_numpy()["preview_scores"][len(PROMPTS):],
                                  out["preview_scores"])


def test_previews_at_several_steps_run_each_step_once(tiny_sd_path, text):
    """Evaluate takes previews at several step counts from one denoising; the last state equals a direct one."""
    renderer = diffusion.load_adapter(tiny_sd_path, "render")
    embeds = text.encode(PROMPTS[:2], GUIDANCE)
    embeds.pop("truncated")
    conditioning = renderer.conditioning(embeds, GUIDANCE, SIZE, SIZE)
    seeds = [5, 6]
    calls = []
    state, scores = denoise_with_previews(renderer, renderer.start(batch_noise(seeds, (4, 32, 32)), STEPS, seeds),
                                          conditioning, [3, 1], lambda images: calls.append(len(images)) or
                                          images.reshape(len(images), -1).mean(axis=1))
    assert sorted(scores) == [1, 3] and calls == [2, 2] and state.step == 3
    direct = renderer.denoise(renderer.start(batch_noise(seeds, (4, 32, 32)), STEPS, seeds), conditioning, until=3)
    assert np.abs((state.latents - direct.latents).numpy()).max() < 1e-5


def test_preview_configuration_is_checked_before_compute(tiny_sd_path, tmp_path):
    base = {"prompts": "examples/parti-sample.tsv", "out": str(tmp_path / "o"), "policy": "preview",
            "candidates": 4, "steps": STEPS}
    for overrides, message in (({"keep": 2}, "use --keep 1"), ({"preview": 5}, "--preview must be between 1 and"),
                               ({"preview_steps": STEPS}, "--preview-steps must be at least 1 and below"),
                               ({"policy": "random", "preview": 2}, "go with --policy preview")):
        with pytest.raises(ConfigError, match=message):
            GenerateConfig(**{**base, **overrides})
    config = GenerateConfig(**base)
    assert (config.preview_count, config.preview_step_count) == (4, 1)
    assert not config.uses_predictor  # all N previewed: nothing to rank
    assert GenerateConfig(**{**base, "preview": 2}).uses_predictor
    with pytest.raises(ConfigError, match="DPMSolverMultistepScheduler cannot"):
        build_plan(GenerateConfig(**{**base, "model": tiny_sd_path, "scheduler": "dpm++"}))


def test_generate_with_the_preview_policy_records_previews_and_reproduces(ray_session, tiny_sd_path, tmp_path):
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("\n".join(PROMPTS) + "\n")
    out = str(tmp_path / "out")
    settings = {"prompts": str(corpus), "out": out, "policy": "preview", "candidates": 4, "preview": 3,
                "preview_steps": PREVIEW_STEPS, "keep": 1, "steps": STEPS, "guidance": GUIDANCE, "batch_size": 6,
                "generator_cpus": 1}
    with pytest.raises(ConfigError, match="needs --predictor"):  # 3 of 4: a predictor ranks them first
        GenerateConfig(model=tiny_sd_path, **settings)
    summary = pipeline.run(GenerateConfig(model="embedded:tiny-sd", **settings))  # its embedded predictor
    rows = manifest_frame(out)
    assert len(rows) == len(PROMPTS) and (rows.status == "ok").all()
    spent = 3 * PREVIEW_STEPS + STEPS - PREVIEW_STEPS
    assert (rows.steps_spent == spent).all() and (rows.preview_steps == PREVIEW_STEPS).all()
    assert summary["denoising_steps_spent"] == spent * len(PROMPTS)
    for row in rows.itertuples():
        previewed, scores = list(row.preview_candidates), list(row.preview_scores)
        assert len(previewed) == 3 and row.candidate_index == previewed[int(np.argmax(scores))]
        assert row.seed == candidate_seeds(0, row.prompt_id, 4)[row.candidate_index]
    assert verify_output(out)["strict_clean"]
    row = rows.iloc[0]
    target = tmp_path / "again.png"
    assert reproduce.main(["--manifest", out, "--prompt-id", row.prompt_id, "--seed", str(int(row.seed)),
                           "--out", str(target)]) == 0
    original = np.asarray(Image.open(row.image_uri))
    assert max_level_difference(original, np.asarray(Image.open(target))) <= 1
