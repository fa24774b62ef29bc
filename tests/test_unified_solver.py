"""The unified solver (actors/models/unified_solver.py): equivalence with diffusers' multistep solvers on the tiny
pipelines, the noise-prediction branches against diffusers' own, and the refusals."""

from __future__ import annotations

import dataclasses
import json

import diffusers
import numpy as np
import pytest
import torch

from actors.models import diffusion, families
from actors.models.seeds import batch_noise
from actors.models.unified_solver import (ScheduleFile, SolverSchedule, StepDecision, UnifiedSolverScheduler,
                                          dpm_solver_pp_schedule, solver_model_identity, solver_timesteps,
                                          unipc_schedule)

torch.set_num_threads(2)
SIZE = 32
GUIDANCE = 4.0
PROMPTS = ["two red squares"]
# (diffusers class, its options, the unified schedule for the same timesteps)
SOLVERS = {
    "dpm++2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"},
                lambda timesteps: dpm_solver_pp_schedule(timesteps, 2)),
    "dpm++3m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3},
                lambda timesteps: dpm_solver_pp_schedule(timesteps, 3)),
    "unipc": (diffusers.UniPCMultistepScheduler, {}, lambda timesteps: unipc_schedule(timesteps, 2)),
    "unipc-3": (diffusers.UniPCMultistepScheduler, {"solver_order": 3}, lambda timesteps: unipc_schedule(timesteps, 3)),
}


def final_latents(adapter: diffusion.PipelineAdapter, scheduler, embeds, latents, steps: int) -> torch.Tensor:
    """The adapter's own denoise loop, run with `scheduler` in place of the pipeline's."""
    adapter.pipe.scheduler = scheduler
    conditioning = adapter.conditioning(embeds, GUIDANCE, SIZE, SIZE)
    return adapter.denoise(adapter.start(latents, steps), conditioning).latents


@pytest.mark.parametrize("family", ["sd", "sdxl", "pixart"])
def test_the_unified_solver_reproduces_dpm_solver_pp_and_unipc_on_the_tiny_pipelines(family, request):
    path = request.getfixturevalue(f"tiny_{family}_path")
    text = diffusion.load_adapter(path, "text")
    render = diffusion.load_adapter(path, "render")
    own_config = render.pipe.scheduler.config
    embeds = text.encode(PROMPTS, GUIDANCE)
    latents = batch_noise([7], families.latent_shape(path, SIZE, SIZE))
    for name, (reference_class, options, schedule_for) in SOLVERS.items():
        for steps in (5,):  # a warm-up, full-order steps and the lowered orders at the end
            reference = reference_class.from_config(own_config, **options)
            reference.set_timesteps(steps)
            schedule = schedule_for(reference.timesteps.tolist())
            expected = final_latents(render, reference, embeds, latents, steps)
            unified = UnifiedSolverScheduler.for_pipeline(own_config, schedule)
            found = final_latents(render, unified, embeds, latents, steps)
            difference = float((found - expected).abs().max())
            assert difference <= 1e-5, (family, name, steps, difference)
            assert float(expected.abs().max()) > 0.1  # a real image's latents, not a degenerate zero


def synthetic_model(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth, deterministic stand-in for a denoiser (the solvers' arithmetic is the subject here)."""
    weights = torch.linspace(-0.4, 0.4, 16).reshape(4, 4)
    return torch.tanh(torch.einsum("ij,bjhw->bihw", weights, x) * (1 + float(t) / 1000)) + 0.1 * x


@pytest.mark.parametrize("reference_class, options, derivative", [
    (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, "dpm"),
    (diffusers.DPMSolverMultistepScheduler,
     {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3}, "dpm"),
    (diffusers.UniPCMultistepScheduler, {"predict_x0": False, "solver_order": 3}, "unip"),
])
def test_noise_prediction_steps_match_diffusers_noise_prediction_solvers(reference_class, options, derivative,
                                                                          tiny_sd_path):
    """Every step but the last (which must use the data prediction to reach noise level zero) with `noise`: each
    intermediate sample equals diffusers' noise-prediction solver's (DPM-Solver, UniPC with predict_x0=False)."""
    config = diffusers.DDIMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler").config
    steps = 8
    reference = reference_class.from_config(config, **options)
    reference.set_timesteps(steps)
    order = options.get("solver_order", 2)
    preset = (dpm_solver_pp_schedule if derivative == "dpm" else unipc_schedule)(reference.timesteps.tolist(), order)
    schedule = SolverSchedule(tuple(StepDecision(step.timestep, "noise" if i < steps - 1 else "data", step.order,
                                                 step.derivative, step.corrector)
                                    for i, step in enumerate(preset.steps)))
    unified = UnifiedSolverScheduler.for_pipeline(config, schedule)
    unified.set_timesteps(steps)
    a = b = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for i, t in enumerate(reference.timesteps[:-1]):
        a = reference.step(synthetic_model(a, t), t, a).prev_sample
        b = unified.step(synthetic_model(b, t), t, b).prev_sample
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(a.abs().max())), (i, float((a - b).abs().max()))


def test_a_searched_kind_of_schedule_runs_with_fractional_timesteps_mixed_decisions_and_no_corrector_at_the_end(
        tiny_sd_path):
    config = diffusers.DDIMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler").config
    schedule = SolverSchedule((
        StepDecision(961.5, "data", 1, "dpm", corrector=True),
        StepDecision(700.25, "noise", 2, "unip", corrector=False),
        StepDecision(420.0, "data", 3, "unip", corrector=True),
        StepDecision(150.75, "noise", 2, "dpm", corrector=True),
        StepDecision(20.0, "data", 1, "unip"),
    ))
    unified = UnifiedSolverScheduler.for_pipeline(config, schedule)
    unified.set_timesteps(5)
    assert unified.timesteps.dtype == torch.float32 and unified.timesteps.tolist() == pytest.approx(
        [961.5, 700.25, 420.0, 150.75, 20.0])
    sigmas = unified.train_sigmas
    assert sigmas[961] < float(unified.sigmas[0]) < sigmas[962]  # interpolated between the training levels
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for t in unified.timesteps:
        x = unified.step(synthetic_model(x, t), t, x).prev_sample
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="step 5 was asked for"):
        unified.step(x, 0, x)


def test_the_last_steps_corrector_costs_one_call_at_timestep_0_and_brings_a_gaussians_exact_flow_closer(
        tiny_sd_path):
    """Data from N(0, s^2): the noise prediction and the probability-flow ODE's solution are exact, so each
    ending's error is measured. The final corrector's extra call at timestep 0 corrects the last move (which then
    ends at timestep 0's noise level, not zero) and lands nearer the exact solution than the same steps without."""
    config = diffusers.DDIMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler").config
    s = 0.5

    def alpha(sigma: float) -> float:
        return 1 / (1 + sigma * sigma) ** 0.5

    def error(schedule: SolverSchedule) -> tuple[float, list[float]]:
        unified = UnifiedSolverScheduler.for_pipeline(config, schedule)
        unified.set_timesteps(schedule.calls)
        start = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        x = start
        for t in unified.timesteps:
            sigma = float(np.interp(float(t), np.arange(len(unified.train_sigmas)), unified.train_sigmas))
            x = unified.step(sigma * x / (alpha(sigma) * (s * s + sigma * sigma)), t, x).prev_sample
        first, end = float(unified.train_sigmas[-1]), float(unified.sigmas[-1])
        exact = start * alpha(end) / alpha(first) * ((s * s + end**2) / (s * s + first**2)) ** 0.5
        with pytest.raises(ValueError, match="was asked for"):
            unified.step(x, 0, x)
        return float((x - exact).pow(2).mean().sqrt()), unified.timesteps.tolist()

    plain = unipc_schedule(solver_timesteps(config, 4), 2)
    corrected = SolverSchedule(plain.steps[:-1] + (StepDecision(plain.steps[-1].timestep, "data", 1, "unip",
                                                                corrector=True),))
    assert plain.calls == 4 and corrected.calls == 5 and corrected.final_corrector
    plain_error, plain_timesteps = error(plain)
    corrected_error, corrected_timesteps = error(corrected)
    assert corrected_timesteps == plain_timesteps + [0]
    assert corrected_error < 0.97 * plain_error, (corrected_error, plain_error)
    # Ending at a nonzero noise level, the last step may then take any prediction and order.
    free = SolverSchedule(plain.steps[:-1] + (StepDecision(plain.steps[-1].timestep, "noise", 2, "dpm",
                                                           corrector=True),))
    assert free.problems() == [] and error(free)[0] < plain_error


def test_the_analytic_first_step_moves_the_starting_noise_as_ddim_would_with_the_noise_as_its_prediction(
        tiny_sd_path):
    config = diffusers.DDIMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler").config
    schedule = SolverSchedule((StepDecision(800, analytic=True, derivative="unip", corrector=True),
                               StepDecision(500, order=2, derivative="unip", corrector=True), StepDecision(200)))
    unified = UnifiedSolverScheduler.for_pipeline(config, schedule)
    unified.set_timesteps(3)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    cumulative = diffusers.DDIMScheduler.from_config(config).alphas_cumprod
    start, at = cumulative[999], cumulative[800]
    expected = at.sqrt() * (x - (1 - start).sqrt() * x) / start.sqrt() + (1 - at).sqrt() * x
    assert float((unified.scale_model_input(x, 800) - expected).abs().max()) <= 1e-5
    # The loop's model sees the moved sample and step() moves its own sample alike: the same as a schedule without
    # the analytic step started from the moved sample.
    moved = unified.scale_model_input(x, 800)
    plain = UnifiedSolverScheduler.for_pipeline(config, SolverSchedule(
        (StepDecision(800, derivative="unip", corrector=True),) + schedule.steps[1:]))
    plain.set_timesteps(3)
    a, b = x, moved
    for t in unified.timesteps:
        a = unified.step(synthetic_model(unified.scale_model_input(a, t), t), t, a).prev_sample
        b = plain.step(synthetic_model(plain.scale_model_input(b, t), t), t, b).prev_sample
    assert float((a - b).abs().max()) <= 1e-6
    with pytest.raises(ValueError, match="analytic first step comes before the first call"):
        UnifiedSolverScheduler.for_pipeline(config, SolverSchedule((StepDecision(999, analytic=True),)))


def test_schedules_are_json_data_with_a_digest_that_changes_with_any_decision():
    schedule = unipc_schedule([999, 749, 499, 249])
    text = json.dumps(schedule.to_dict())
    again = SolverSchedule.from_dict(json.loads(text))
    assert again == schedule and again.digest == schedule.digest
    changed = SolverSchedule(schedule.steps[:1] + (StepDecision(749, "data", 2, "unip", corrector=False),)
                             + schedule.steps[2:])
    assert changed.digest != schedule.digest
    with pytest.raises(ValueError, match="expected an object with `timestep`"):
        SolverSchedule.from_dict({"steps": [{"timestep": 999, "pickle": "no"}]})


@pytest.mark.parametrize("steps, message", [
    ([StepDecision(999, order=2), StepDecision(500)], "order 2 needs 1 earlier model calls"),
    ([StepDecision(999), StepDecision(999)], "does not come after"),
    ([StepDecision(999), StepDecision(500, prediction="noise")], "must use the data prediction"),
    ([StepDecision(999), StepDecision(0, corrector=True)], "must start above it"),
    ([StepDecision(999), StepDecision(500, order=2)], "takes order 1"),
    ([StepDecision(1200)], "outside 0..999"),
    ([StepDecision(999, derivative="taylor")], "derivative 'taylor'"),
])
def test_a_schedule_that_cannot_run_is_refused_with_the_step_and_the_reason(steps, message, tiny_sd_path):
    config = diffusers.DDIMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler").config
    with pytest.raises(ValueError, match=message):
        UnifiedSolverScheduler.for_pipeline(config, SolverSchedule(tuple(steps)))


def test_the_unified_solver_refuses_a_step_count_or_a_noise_schedule_it_was_not_made_for(tiny_sd_path):
    config = diffusers.DDIMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler").config
    unified = UnifiedSolverScheduler.for_pipeline(config, unipc_schedule([999, 666, 333]))
    with pytest.raises(ValueError, match="makes 3 model calls; the run asks for 4 steps"):
        unified.set_timesteps(4)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        UnifiedSolverScheduler.for_pipeline({**config, "use_karras_sigmas": True}, unipc_schedule([999, 500]))
    with pytest.raises(ValueError, match="thresholding"):
        UnifiedSolverScheduler.for_pipeline({**config, "thresholding": True}, unipc_schedule([999, 500]))


# --- a schedule file in a run: generate, the manifest rows, reproduce, and the refusals before compute ---------


def write_schedule(path, model: str, timesteps: list[int], solver=unipc_schedule) -> ScheduleFile:
    from actors.models.embedded import resolve_model

    found = ScheduleFile(solver(timesteps), {"name": model, **solver_model_identity(resolve_model(model))},
                         objective={"kind": "hand-written, for the tests"}, figures={})
    path.write_text(json.dumps(found.to_dict(), indent=2))
    return found


def test_a_schedule_file_collects_is_recorded_in_rows_and_run_json_reproduces_and_evaluate_renders_it(
        ray_session, tmp_path):
    """The collect job with --scheduler schedule:PATH (generate's flow plus the training set), then what reproduce
    and evaluate make of its output: the same images from the rows and from the training set."""
    from PIL import Image

    from jobs import collect, reproduce
    from jobs.common import config_from_args
    from orchestrator.flow import pipeline
    from orchestrator.run.config import ConfigError
    from tests.helpers_manifest import manifest_frame

    schedule = write_schedule(tmp_path / "schedule.json", "embedded:tiny-sd", [999, 749, 499])
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("a red circle\ntwo blue squares\n")
    out = tmp_path / "out"
    flags = ["--prompts", str(corpus), "--out", str(out), "--candidates", "2", "--steps", "3", "--batch-size", "2",
             "--generator-cpus", "1", "--scheduler", f"schedule:{tmp_path / 'schedule.json'}"]
    assert collect.main([*flags, "--json"]) == 0
    rows = manifest_frame(str(out))
    assert len(rows) == 4 and set(rows.scheduler) == {schedule.label}
    run = json.loads((out / "run.json").read_text())
    assert run["solver_schedule"] == schedule.to_dict() and run["fingerprint_fields"]["scheduler"] == schedule.label
    row = rows.iloc[0]
    target = tmp_path / "again.png"
    assert reproduce.main(["--manifest", str(out), "--prompt-id", row.prompt_id, "--seed", str(int(row.seed)),
                           "--out", str(target)]) == 0
    original = np.asarray(Image.open(row.image_uri), dtype=np.int16)
    assert np.abs(original - np.asarray(Image.open(target), dtype=np.int16)).max() <= 1
    # evaluate renders a training set's candidates with the schedule its collect output's run.json holds.
    import pandas as pd

    from actors.models import diffusion
    from actors.models.embedded import resolve_model
    from orchestrator.evaluation.figures import render_candidates
    from orchestrator.output.dataset import dataset_solver_schedule

    dataset = pd.read_parquet(out / "dataset.parquet")
    first = dataset[(dataset.prompt_id == row.prompt_id) & (dataset.seed == row.seed)].iloc[0]
    assert len(dataset) == 4 and first.scheduler == schedule.label
    identity = {key: first[key] for key in ("model", "scheduler", "steps", "guidance", "width", "height")}
    identity["solver_schedule"] = dataset_solver_schedule(str(out), identity)
    assert identity["solver_schedule"] == schedule.to_dict()
    model_path = resolve_model(first.model)
    images, _ = render_candidates(model_path, identity, diffusion.load_adapter(model_path, "text"), [first.prompt],
                                  [[int(first.seed)]])
    assert np.abs(original - images[0].astype(np.int16)).max() <= 1
    # The same schedule at another path is the same run; an edited schedule is another configuration.
    config = config_from_args(collect.parser().parse_args(flags), all_candidates=True, keep=2, save_images=True)
    (tmp_path / "moved.json").write_text((tmp_path / "schedule.json").read_text())
    assert pipeline.run(dataclasses.replace(config, scheduler=f"schedule:{tmp_path / 'moved.json'}"))["images"] == 4
    write_schedule(tmp_path / "edited.json", "embedded:tiny-sd", [999, 700, 400])
    with pytest.raises(ConfigError, match="another configuration"):
        pipeline.run(dataclasses.replace(config, scheduler=f"schedule:{tmp_path / 'edited.json'}"))


def test_a_schedule_for_another_model_step_count_or_policy_or_a_damaged_one_is_refused_before_compute(tmp_path):
    from orchestrator.run.config import ConfigError, GenerateConfig
    from orchestrator.run.plan import build_plan

    def plan(scheduler: str, **overrides):
        values = dict(prompts="unused.txt", out=str(tmp_path / "out"), candidates=4, keep=2, steps=3,
                      scheduler=scheduler)
        return build_plan(GenerateConfig(**{**values, **overrides}))

    write_schedule(tmp_path / "tiny.json", "embedded:tiny-sd", [999, 749, 499])
    assert plan(f"schedule:{tmp_path / 'tiny.json'}").scheduler.startswith("schedule:")
    with pytest.raises(ConfigError, match="searched for 3 model calls; this run asks for --steps 4"):
        plan(f"schedule:{tmp_path / 'tiny.json'}", steps=4)
    with pytest.raises(ConfigError, match="differs from this one in"):
        plan(f"schedule:{tmp_path / 'tiny.json'}", model="embedded:shapes")
    with pytest.raises(ConfigError, match="--policy preview"):
        plan(f"schedule:{tmp_path / 'tiny.json'}", policy="preview", keep=1, preview=2, preview_steps=1)
    damaged = json.loads((tmp_path / "tiny.json").read_text())
    damaged["schedule"]["steps"][1]["order"] = 1
    (tmp_path / "damaged.json").write_text(json.dumps(damaged))
    with pytest.raises(ConfigError, match="does not match its content"):
        plan(f"schedule:{tmp_path / 'damaged.json'}")
    with pytest.raises(ConfigError, match="no such file"):
        plan(f"schedule:{tmp_path / 'missing.json'}")
    with pytest.raises(ConfigError, match="schedule:PATH for a searched schedule.json"):
        plan("schedule:")


def test_searched_picks_the_schedule_shipped_for_the_model_and_step_count_and_refuses_any_other():
    from actors.models.embedded import SHIPPED_SCHEDULES
    from orchestrator.run.config import ConfigError, GenerateConfig
    from orchestrator.run.plan import build_plan

    def plan(**values):
        return build_plan(GenerateConfig(**{"prompts": "unused.txt", "out": "unused", "candidates": 4, "keep": 2,
                                            "scheduler": "searched", **values}))

    for steps, path in SHIPPED_SCHEDULES["shapes"].items():
        shipped = ScheduleFile.from_dict(json.loads(path.read_text()))
        found = plan(model="embedded:shapes", steps=steps)  # fits the shipped model: identity, calls, validity
        assert found.scheduler == shipped.label and found.solver_schedule == shipped.to_dict()
        assert found.fingerprint_fields["scheduler"] == shipped.label
        assert shipped.figures["holdout"]["searched"]["rmse"] > 0  # it carries its search's held-out figures
    with pytest.raises(ConfigError, match="ship for embedded:shapes at --steps 4, 6, 8; 5 steps"):
        plan(model="embedded:shapes", steps=5)
    with pytest.raises(ConfigError, match="ship for embedded:shapes only"):
        plan(model="embedded:tiny-sd", steps=4)
