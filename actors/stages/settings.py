"""What each stage is handed: its own settings, built once by the run's plan (orchestrator/run/plan.py, RunPlan)
and shipped to its actors. Plain frozen values, so a stage depends on nothing of the driver."""

from __future__ import annotations

from dataclasses import dataclass

from actors.predictor.budget import BudgetRule


@dataclass(frozen=True)
class ScoringPlan:
    """What a scorer actor needs, in one object instead of a dozen loose arguments."""

    model: str
    run_seed: int
    candidates: int
    keep: int  # rows kept per prompt (all N when collecting)
    policy: str  # random, predictor, budget or all
    guidance: float
    height: int
    width: int
    latent_shape: tuple  # of one candidate's noise, from the model and the size (derived once, by the plan)
    prompts_per_call: int  # prompts embedded and scored per call: sized by the rows that leave the scorer
    predictor_source: str = ""
    budget_rule: BudgetRule | None = None
    preview: int = 0  # preview policy: candidates sent on to the generator's preview cascade per prompt


@dataclass(frozen=True)
class RenderPlan:
    """What a generator actor needs: how to render, and for the preview policy how to preview."""

    model: str
    steps: int
    guidance: float
    height: int
    width: int
    latent_shape: tuple  # of one seed's noise, from the model and the size (derived once, by the plan)
    scheduler: str  # the --scheduler name
    solver_schedule: dict | None = None  # --scheduler schedule:PATH: the schedule file's content
    attention: str = "full"  # the denoiser's self-attention, an AttentionPlan label (actors/models/attention_plan.py)
    preview: int = 0  # candidates previewed per prompt (0: no preview, render the rows as they come)
    preview_steps: int = 0
    rater: str = ""  # the run's rater: rates the previews, and the renders when rates_images
    rates_images: bool = False  # a pixel rater: the generator scores its own renders (no rater actor)
