"""Sparse self-attention in the denoisers (actors/models/attention.py, issue 22): the plan and its label, the
processor's caches (Re-ttention's ratio and residual), and renders of the tiny PixArt and SD pipelines with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actors.models import diffusion
from actors.models.attention import (
    SparseSelfAttention,
    StepClock,
    install,
    self_attention_layers,
)
from actors.models.attention_plan import AttentionPlan, paper_full_steps
from actors.models.families import latent_shape
from actors.models.seeds import batch_noise
from actors.models.sparse_attention import band_block_mask, token_mask


def qkv(batch=4, heads=2, tokens=64, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, dim, generator=generator) for _ in range(3)]


def test_the_plan_resolves_the_papers_schedule_reads_its_label_back_and_refuses_what_cannot_run():
    assert paper_full_steps(20) == (0, 1, 2, 3, 4, 5, 10, 15)  # 8 of 20 full, as in the paper
    assert paper_full_steps(8) == (0, 1, 2, 4, 6)
    plan = AttentionPlan.resolve("re-ttention", 0.031, "paper", 20)
    assert plan.label == "re-ttention@0.031/0,1,2,3,4,5,10,15"
    assert AttentionPlan.from_label(plan.label) == plan
    assert AttentionPlan.from_label(None) == AttentionPlan.from_label("full") == AttentionPlan.resolve(
        "full", 0.5, "x", 20)
    assert AttentionPlan.resolve("sparse", 0.0625, "0,1, 10", 20).full_steps == (0, 1, 10)
    for flags, message in [(("dense", 0.1, "paper"), "unknown"), (("sparse", 1.0, "paper"), "below 1"),
                           (("sparse", 0.1, "1,2"), "must include step 0"), (("sparse", 0.1, "0,20"), "outside"),
                           (("sparse", 0.1, "0,a"), "expected 'paper'")]:
        with pytest.raises(ValueError, match=message):
            AttentionPlan.resolve(*flags, 20)


def step(processor: SparseSelfAttention, number: int, q, k, v) -> torch.Tensor:
    processor.clock.step = number
    return processor.attend(q, k, v)


@pytest.mark.parametrize("mode", ["sparse", "ratio", "residual", "re-ttention"])
def test_sparse_steps_attend_inside_the_band_and_each_mode_applies_its_own_correction(mode):
    """Step 0 full, step 1 sparse. On the sparse step every mode is the band's attention (exactly dense attention
    under the band mask) with its correction from step 0's caches; with unchanged inputs Re-ttention's correction
    gives back step 0's full output, which shows the caches are the full step's."""
    q, k, v = qkv()
    processor = SparseSelfAttention(StepClock(AttentionPlan(mode, 0.1, (0,))))
    full = F.scaled_dot_product_attention(q, k, v)
    assert float((step(processor, 0, q, k, v) - full).abs().max()) <= 1e-5
    mask = band_block_mask(64, 0.1)
    band = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask(mask, 1, 64))
    inside = (torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) * token_mask(mask, 1, 64)).sum(-1, keepdim=True)
    expected = {"sparse": band, "ratio": inside * band, "residual": full, "re-ttention": full}[mode]
    assert float((step(processor, 1, q, k, v) - expected).abs().max()) <= 1e-5
    assert float((band - full).abs().max()) > 0.1  # the band really leaves keys out
    # New inputs on a sparse step: the correction is still the full step's, per image and head.
    q2, k2, v2 = qkv(seed=1)
    band2 = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=token_mask(mask, 1, 64))
    corrected = {"sparse": band2, "ratio": inside * band2, "residual": band2 + (full - band),
                 "re-ttention": inside * band2 + (full - inside * band)}[mode]
    assert float((step(processor, 2, q2, k2, v2) - corrected).abs().max()) <= 1e-5


def test_caches_are_per_image_so_a_batch_corrects_each_image_as_alone_and_a_smaller_batch_is_refused():
    q, k, v = qkv(batch=4)
    q2, k2, v2 = qkv(batch=4, seed=3)
    together = SparseSelfAttention(StepClock(AttentionPlan("re-ttention", 0.1, (0,))))
    step(together, 0, q, k, v)
    batch = step(together, 1, q2, k2, v2)
    for row in range(4):
        alone = SparseSelfAttention(StepClock(AttentionPlan("re-ttention", 0.1, (0,))))
        step(alone, 0, q[row:row + 1], k[row:row + 1], v[row:row + 1])
        one = step(alone, 1, q2[row:row + 1], k2[row:row + 1], v2[row:row + 1])
        assert float((batch[row:row + 1] - one).abs().max()) <= 1e-5
    with pytest.raises(RuntimeError, match="caches of a batch of 4 from the last full step, a batch of 2 now"):
        step(together, 2, q2[:2], k2[:2], v2[:2])


def render(adapter, path, prompts, steps, label, guidance=4.0):
    adapter.use_attention(label)
    embeds = adapter.encode(prompts, guidance)
    latents = batch_noise([11 + i for i in range(len(prompts))], latent_shape(path, 64, 64))
    return adapter.render(embeds, latents, steps=steps, guidance_scale=guidance, height=64, width=64).astype(np.int16)


@pytest.mark.parametrize("family", ["pixart", "sd", "sdxl"])
def test_a_render_with_sparse_attention_runs_each_mode_and_with_every_step_full_is_the_full_render(
        family, request):
    path = request.getfixturevalue(f"tiny_{family}_path")  # each case builds (once a session) only its own pipeline
    adapter = diffusion.load_adapter(path, "full")
    layers = self_attention_layers(adapter.denoiser)
    assert layers and all(name.endswith("attn1.processor") for name in layers)
    prompts = ["a red circle", "two blue squares"]
    full = render(adapter, path, prompts, 4, "full")
    every_step_full = render(adapter, path, prompts, 4, AttentionPlan("re-ttention", 0.1, (0, 1, 2, 3)).label)
    assert np.abs(every_step_full - full).max() <= 1
    processors = adapter.denoiser.attn_processors
    assert all(isinstance(processors[name], SparseSelfAttention) for name in layers)
    assert not any(isinstance(p, SparseSelfAttention) for n, p in processors.items() if n not in layers)
    naive = render(adapter, path, prompts, 4, AttentionPlan("sparse", 0.1, (0,)).label)
    assert np.abs(naive - full).max() > 0  # sparse steps change the image (random weights: by how much is noise)
    again = render(adapter, path, prompts, 4, AttentionPlan("sparse", 0.1, (0,)).label)
    assert np.array_equal(naive, again)  # and the same render twice is the same image
    assert np.array_equal(render(adapter, path, prompts, 4, "full"), full)  # "full" puts the stock processors back


def test_full_attention_installs_nothing_and_a_denoiser_without_self_attention_is_refused(tiny_sd_path):
    adapter = diffusion.load_adapter(tiny_sd_path, "render")
    before = dict(adapter.denoiser.attn_processors)
    assert install(adapter.denoiser, AttentionPlan()) is None
    assert dict(adapter.denoiser.attn_processors) == before
    with pytest.raises(ValueError, match="has no self-attention layer"):
        install(adapter.pipe.vae, AttentionPlan("sparse", 0.1, (0,)))


# --- in a run: flags, rows, fingerprint, reproduce, refusals ------------------------------------------------------


def test_a_run_with_re_ttention_records_it_in_rows_and_fingerprint_and_reproduce_honours_it(ray_session, tmp_path):
    from PIL import Image

    from jobs import reproduce
    from orchestrator.flow import pipeline
    from orchestrator.run.config import ConfigError, GenerateConfig
    from tests.helpers_manifest import manifest_frame

    corpus = tmp_path / "prompts.txt"
    corpus.write_text("a red circle\ntwo blue squares\n")
    values = dict(prompts=str(corpus), out=str(tmp_path / "out"), model="embedded:shapes-dit", candidates=2, keep=1,
                  steps=4, guidance=5.0, batch_size=2, generator_cpus=1, rater="shapes", attention="re-ttention",
                  attention_density=0.1, attention_full_steps="0,2")
    config = GenerateConfig(**values)
    assert pipeline.run(config)["images"] == 2
    rows = manifest_frame(values["out"])
    assert set(rows.attention) == {"re-ttention@0.1/0,2"} and rows.score.notna().all()
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["fingerprint_fields"]["attention"] == "re-ttention@0.1/0,2"
    row = rows.iloc[0]
    target = tmp_path / "again.png"
    assert reproduce.main(["--manifest", values["out"], "--prompt-id", row.prompt_id, "--seed", str(int(row.seed)),
                           "--out", str(target)]) == 0
    original = np.asarray(Image.open(row.image_uri), dtype=np.int16)
    assert np.abs(original - np.asarray(Image.open(target), dtype=np.int16)).max() <= 1
    # Rendered with full attention instead, the same row is another image: reproduce really used the row's.
    from jobs.reproduce import reproduce_image

    full = reproduce_image({**row.to_dict(), "attention": "full"}).astype(np.int16)
    assert np.abs(original - full).max() > 1
    # Another density is another configuration of the same output; full attention keeps the old fingerprint.
    with pytest.raises(ConfigError, match="another configuration"):
        pipeline.run(GenerateConfig(**{**values, "attention_density": 0.2}))
    full_fields = GenerateConfig(**{**values, "attention": "full"})
    from orchestrator.run.plan import build_plan

    assert "attention" not in build_plan(full_fields).fingerprint_fields


@pytest.mark.parametrize("overrides, message", [
    ({"attention": "sparse", "policy": "preview", "candidates": 4}, "not sliced to the one that continues"),
    ({"attention": "dense"}, "--attention 'dense' is unknown"),
    ({"attention": "re-ttention", "attention_full_steps": "3,5"}, "must include step 0"),
    ({"attention": "re-ttention", "attention_full_steps": "0,25"}, "outside 0..19"),
    ({"attention": "sparse", "attention_density": 0}, "above 0 and below 1"),
])
def test_attention_flags_that_cannot_work_are_refused_with_the_configuration(overrides, message):
    from orchestrator.run.config import ConfigError, GenerateConfig

    with pytest.raises(ConfigError, match=message):
        GenerateConfig(prompts="p.txt", out="out", **overrides)


def test_manifest_objects_written_before_the_attention_column_read_it_as_null(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.output.manifest import _read_columns

    pq.write_table(pa.table({"prompt_id": ["a"], "seed": [1]}), tmp_path / "old.parquet")
    table = _read_columns(pq.ParquetFile(tmp_path / "old.parquet"), ["prompt_id", "attention", "seed"])
    assert table.column_names == ["prompt_id", "attention", "seed"]
    assert table["attention"].to_pylist() == [None] and table.schema.field("attention").type == pa.string()


@pytest.mark.slow  # two small runs: about 20 CPU-seconds
@pytest.mark.parametrize("model, mode", [("embedded:tiny-pixart", "re-ttention"), ("embedded:shapes-dit", "sparse")])
def test_generate_end_to_end_with_each_attention_mode(ray_session, tmp_path, model, mode):
    """Each mode through the whole run (scorer, generator, rater, manifest): Re-ttention on the tiny PixArt pipeline,
    sparse on the trained DiT testbed; rows carry their mode's label, and on the trained model sparse steps change
    the image against the same row rendered with full attention. (Full attention through a run is every other
    PixArt test's; Re-ttention on the DiT is the fast test above's; sparse on tiny-pixart, and each mode on SD and
    SDXL, at the render: the fast test_a_render_with_sparse_attention_runs_each_mode_and_with_every_step_full_is_...)
    """
    from PIL import Image

    from jobs.reproduce import reproduce_image
    from orchestrator.flow import pipeline
    from orchestrator.run.config import GenerateConfig
    from tests.helpers_manifest import manifest_frame

    corpus = tmp_path / "prompts.txt"
    corpus.write_text("three green triangles\n")
    out = tmp_path / mode
    config = GenerateConfig(prompts=str(corpus), out=str(out), model=model, candidates=1, keep=1, steps=4,
                            guidance=5.0, batch_size=1, generator_cpus=1, attention=mode,
                            attention_density=0.1, attention_full_steps="0")
    assert pipeline.run(config)["images"] == 1
    (row,) = manifest_frame(str(out)).itertuples()
    assert row.attention == f"{mode}@0.1/0" and row.status == "ok"
    if model == "embedded:shapes-dit":
        image = np.asarray(Image.open(row.image_uri), dtype=np.int16)
        full = reproduce_image({**row._asdict(), "attention": "full"}).astype(np.int16)
        assert np.abs(image - full).max() > 8
