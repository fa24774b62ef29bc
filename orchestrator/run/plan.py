"""The run plan: every value derived from a frozen GenerateConfig, computed once before compute starts.

Built by the pipeline right after the configuration (image size from the model, the predictor's bytes and digest,
the budget rule, the fingerprint); the stages get what they need from it. Nothing here is written back into the
configuration, so run.json, manifests and the summary all see one fingerprint.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field

from actors.models.attention_plan import AttentionPlan
from actors.predictor.budget import BudgetRule
from actors.stages.settings import RenderPlan, ScoringPlan
from orchestrator.corpus.listing import Columns
from orchestrator.corpus.reader import ReadSettings
from orchestrator.run.config import ConfigError, GenerateConfig, fingerprint_of

logger = logging.getLogger("seedsift")


@dataclass(frozen=True)
class PredictorPlan:
    """The predictor a run scores with: read once by the driver, shipped to the scorers as bytes."""

    location: str
    files: dict = field(repr=False)  # config.json and model.safetensors, as bytes
    digest: str
    trained: object = field(repr=False)  # its PredictorConfig
    evaluation: dict | None = field(default=None, repr=False)  # its evaluation.json (held-out figures), if any


@dataclass(frozen=True)
class RunPlan:
    config: GenerateConfig
    model_path: str
    width: int
    height: int
    latent_shape: tuple
    scheduler: str  # the pipeline's scheduler class, recorded in every manifest row
    predictor: PredictorPlan | None = None
    budget_per_prompt: float | None = None  # --budget, or --budget-images spread over the corpus
    budget_rule: BudgetRule | None = None
    warnings: tuple = ()  # setting mismatches worth a line in the log and a place in the summary
    # Whether the corpus's ids are qualified by their file (NAME#ID): a folder or glob corpus, into an output laid
    # out so (every output begun since 0.3); set from Manifest.begin_run once the output's layout is known.
    ids_per_file: bool = False
    # --scheduler schedule:PATH: the schedule file's content (read once by the driver, handed to the generators)
    solver_schedule: dict | None = field(default=None, repr=False)

    @property
    def fingerprint_fields(self) -> dict:
        fields = self.config.fingerprint_fields()
        fields.update(width=self.width, height=self.height,
                      predictor=self.predictor.digest if self.predictor and self.config.uses_predictor else None)
        if self.solver_schedule is not None:
            fields.update(scheduler=self.scheduler)  # the schedule's digest, wherever its file lies
        if self.attention.sparse:  # only then, so full-attention outputs keep the fingerprint they had
            fields.update(attention=self.attention.label)
        return fields

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.fingerprint_fields)

    @property
    def run_file(self) -> dict:
        """What run.json records of this run (Manifest.begin_run adds the layout's version and id scope, and when)."""
        record = {"fingerprint": self.fingerprint, "fingerprint_fields": self.fingerprint_fields,
                  "layout": self.config.layout_fields(), "config": self.config.public_dict()}
        if self.solver_schedule is not None:  # what reproduce renders a `schedule:<digest>` row with
            record["solver_schedule"] = self.solver_schedule
        return record

    @property
    def run_fields(self) -> dict:
        """Columns every manifest row of this run carries."""
        config = self.config
        return {
            "model": config.model,
            "scheduler": self.scheduler,
            "attention": self.attention.label,
            "steps": config.steps,
            "guidance": config.guidance,
            "width": self.width,
            "height": self.height,
            "policy": config.policy_name,
            "rater": config.rater,
            "run_id": self.fingerprint,
        }

    @functools.cached_property
    def attention(self) -> AttentionPlan:
        """The denoiser's self-attention, resolved for the run's steps (validated with the configuration)."""
        config = self.config
        return AttentionPlan.resolve(config.attention, config.attention_density, config.attention_full_steps,
                                     config.steps)

    @functools.cached_property
    def reading(self) -> ReadSettings:
        """What every corpus read task is handed (the driver's own reads too): built once per plan."""
        config = self.config
        return ReadSettings(shard_size=config.shard_size, sample=config.sample, storage_options=config.storage_options,
                            columns=Columns(config.prompt_column, config.id_column), ids_per_file=self.ids_per_file)

    @functools.cached_property
    def scoring(self) -> ScoringPlan:
        """What every scorer is handed: built once per plan."""
        config = self.config
        rows_per_block = min(config.scorer_batch_size, config.batch_size * config.generators)
        return ScoringPlan(
            model=config.model, run_seed=config.seed, candidates=config.candidates, keep=config.rows_per_prompt,
            policy=config.policy_name, guidance=config.guidance, height=self.height, width=self.width,
            latent_shape=tuple(self.latent_shape),
            # A generator task renders a whole scorer block before any row moves on: blocks of about one round of
            # generator batches commit rows early and spread a small corpus over several generators. Counting rows,
            # not prompts, also bounds a block's memory (an SDXL row carries about 1.3 MB of embeddings).
            prompts_per_call=max(1, rows_per_block // config.rows_per_prompt),
            predictor_source=self.predictor.location if self.predictor else "",
            budget_rule=self.budget_rule,
            preview=config.preview_count if config.policy_name == "preview" else 0,
        )

    @functools.cached_property
    def rendering(self) -> RenderPlan:
        """What every generator is handed: built once per plan."""
        config = self.config
        preview = config.policy_name == "preview"
        from actors.raters.specs import is_pixel_rater

        return RenderPlan(model=config.model, steps=config.steps, guidance=config.guidance, height=self.height,
                          width=self.width, latent_shape=tuple(self.latent_shape), scheduler=config.scheduler,
                          solver_schedule=self.solver_schedule, attention=self.attention.label,
                          preview=config.preview_count if preview else 0,
                          preview_steps=config.preview_step_count if preview else 0, rater=config.rater,
                          rates_images=is_pixel_rater(config.rater))

    def with_budget(self, usable_prompts: int) -> RunPlan:
        """--budget-images: the total spread over the usable prompts of the corpus (a counting pass)."""
        if usable_prompts == 0:
            raise ConfigError(f"--prompts {self.config.prompts}: no usable prompt to spend --budget-images on")
        per_prompt = min(float(self.config.keep), max(1.0, self.config.budget_images / usable_prompts))
        logger.info("budget: %d images over %d prompts = %.3f renders per prompt", self.config.budget_images,
                    usable_prompts, per_prompt)
        return dataclasses.replace(self, budget_per_prompt=per_prompt,
                                   budget_rule=budget_rule(self.config, self.predictor.trained, per_prompt))


def build_plan(config: GenerateConfig) -> RunPlan:
    """Everything that can be derived, or found wrong, before compute: model folder, size, predictor (the rater spec
    is checked with the rest of the configuration, in GenerateConfig.validate)."""
    from actors.models import families
    from actors.models.embedded import resolve_model
    from actors.models.solvers import SEARCHED, is_schedule_file

    model_path = resolve_model(config.model)
    default_width, default_height = families.default_image_size(model_path)
    width, height = config.width or default_width, config.height or default_height
    try:
        latent_shape = families.latent_shape(model_path, height, width)
    except ValueError as exc:
        raise ConfigError(f"--width/--height: {exc}") from exc
    searched = is_schedule_file(config.scheduler) or config.scheduler == SEARCHED
    plan = RunPlan(config=config, model_path=model_path, width=width, height=height, latent_shape=latent_shape,
                   scheduler=config.scheduler if searched else families.scheduler_label(model_path, config.scheduler))
    if searched:
        plan = _with_schedule(plan)
    if config.policy_name == "preview":
        try:
            families.check_resumable_solver(model_path, config.scheduler)
        except ValueError as exc:
            raise ConfigError(f"--policy preview: {exc}") from exc
    if config.uses_predictor:
        plan = _with_predictor(plan)
    return plan


def _with_schedule(plan: RunPlan) -> RunPlan:
    """--scheduler schedule:PATH (or searched, the one shipped for this embedded model and step count): read the
    schedule once and refuse one searched for another model or step count."""
    from actors.models.embedded import shipped_schedule
    from actors.models.solvers import SCHEDULE_PREFIX, SEARCHED
    from orchestrator.run.solver_files import read_schedule_file

    config = plan.config
    if config.scheduler == SEARCHED:
        try:
            path = str(shipped_schedule(config.model, config.steps))
        except ValueError as exc:
            raise ConfigError(f"--scheduler {SEARCHED}: {exc}") from exc
    else:
        path = config.scheduler[len(SCHEDULE_PREFIX):]
    schedule = read_schedule_file(path, config.storage_options)
    try:
        schedule.check_fits(plan.model_path, config.steps)
    except ValueError as exc:
        raise ConfigError(f"--scheduler {config.scheduler}: {exc}") from exc
    if config.policy_name == "preview":
        raise ConfigError("--policy preview pauses a denoising and continues the best preview, which a searched "
                          "schedule's multistep history does not allow; use --scheduler ddim, euler or euler-a")
    return dataclasses.replace(plan, scheduler=schedule.label, solver_schedule=schedule.to_dict())


def _with_predictor(plan: RunPlan) -> RunPlan:
    """Read the predictor once and refuse one trained for another pipeline, before any compute."""
    from actors.predictor.model import predictor_from_files, weights_digest
    from orchestrator.run.predictor_files import (as_config_error, read_evaluation, read_predictor_files,
                                                  resolve_predictor)

    config = plan.config
    # Problems raise a ConfigError naming where the predictor was read from.
    location = resolve_predictor(config.predictor, config.model)
    files = read_predictor_files(location, config.model, config.storage_options)
    # Built once here, so a damaged or mismatched predictor stops the run before any actor starts.
    with as_config_error():
        trained = predictor_from_files(files, plan.model_path, plan.height, plan.width, source=location).config
    warnings = []
    used_settings = {"steps": config.steps, "guidance": config.guidance, "scheduler": plan.scheduler}
    for name, used in used_settings.items():
        recorded = trained.pipeline.get(name)
        if recorded not in (None, used):
            warnings.append(f"predictor {location} was trained at {name}={recorded}; this run uses {name}={used}: "
                            "its ranking may be weaker")
    for warning in warnings:
        logger.warning(warning)
    predictor = PredictorPlan(location=location, files=files, digest=weights_digest(files), trained=trained,
                              evaluation=read_evaluation(location, config.storage_options))
    plan = dataclasses.replace(plan, predictor=predictor, warnings=plan.warnings + tuple(warnings))
    if config.policy == "budget" and config.budget is not None:
        plan = dataclasses.replace(plan, budget_per_prompt=config.budget,
                                   budget_rule=budget_rule(config, trained, config.budget))
    return plan


def budget_rule(config: GenerateConfig, trained, per_prompt: float) -> BudgetRule:
    """The budget policy's threshold, calibrated on the predictor's recorded spreads so that the corpus-average
    renders per prompt meet the budget; prompts stream, so the rule cannot look at the whole corpus first."""
    from actors.predictor.budget import calibrate_threshold

    residual_std = float(trained.metrics.get("residual_std", 0.0))
    residual_ratio = float(trained.metrics.get("residual_ratio", 0.0))
    if not trained.spread_quantiles or (residual_std <= 0 and residual_ratio <= 0):
        raise ConfigError("--policy budget: this predictor records no spread quantiles or residual error; "
                          "retrain it with the current `seedsift train`")
    threshold = calibrate_threshold(trained.spread_quantiles, per_prompt, config.candidates, config.keep, 1,
                                    residual_std, residual_ratio)
    return BudgetRule(threshold, residual_std, residual_ratio)
