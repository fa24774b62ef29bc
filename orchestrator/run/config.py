"""The job configuration: what the user asked for, validated once when it is built and frozen from then on.

Built by the job entry points from the command line. Values derived from it (image size, predictor bytes and
digest, budget rule, fingerprint) live in `orchestrator.run.plan.RunPlan`, never written back here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from actors.models.paths import looks_like_local_path

POLICIES = ("random", "predictor", "budget", "preview")
# Candidates per prompt, at most: scored in bounded chunks, so memory does not grow with N; time does (about a
# minute a prompt at this N with the tiny pipeline's predictor on one core).
MAX_CANDIDATES = 1_000_000
PREVIEW_CANDIDATES = 4  # --policy preview: candidates previewed when --preview is not given
PREVIEW_SHARE = 4  # and their preview steps: a quarter of the schedule
IMAGE_FORMATS = ("png", "jpeg", "webp")
IMAGE_OUTPUTS = ("files", "shards")
DEFAULT_MODEL = "embedded:tiny-sd"


class ConfigError(ValueError):
    """A configuration problem found before compute starts; the message names the input and the fix."""


@dataclass(frozen=True)
class GenerateConfig:
    prompts: str
    out: str
    prompt_column: str | None = None  # None: detected by name (see orchestrator/corpus/listing.py)
    id_column: str | None = None
    model: str = DEFAULT_MODEL
    candidates: int = 4
    keep: int = 1
    policy: str = "random"
    predictor: str | None = None
    steps: int = 20
    guidance: float = 7.5
    # The solver: default (the pipeline's own) or a name in actors.models.solvers.SCHEDULERS.
    scheduler: str = "default"
    width: int | None = None  # None: the pipeline's native size (resolved in the plan)
    height: int | None = None
    # Self-attention of the denoiser (actors/models/attention_plan.py): full, sparse or re-ttention; the kept
    # share of keys on sparse steps; which steps are full ("paper" or step numbers).
    attention: str = "full"
    attention_density: float = 0.031
    attention_full_steps: str = "paper"
    batch_size: int = 4
    generators: int = 1
    scorers: int = 1
    rater: str = "colorfulness"
    seed: int = 0
    limit: int | None = None
    address: str | None = None
    generator_gpus: float | None = None  # None: 1 per generator when the cluster has GPUs, else 0
    generator_cpus: float | None = None  # None: 2 per generator on GPU clusters, all cores but one on CPU
    scorer_cpus: float = 0.5
    scorer_batch_size: int = 32
    rater_cpus: float = 0.25
    rater_gpus: float = 0.0
    image_format: str = "png"
    image_output: str = "files"  # files: one object per image; shards: WebDataset tars per manifest shard
    shard_size: int = 10_000  # corpus rows per manifest shard (fixed for the life of an output)
    shard_images: int = 1000  # images per WebDataset tar with image_output="shards"
    dedup_buckets: int | None = None  # None: sized from the output (about 8M keys a bucket; 1: in the filter)
    wait: bool = False  # another run holds the output: wait for it instead of refusing
    lease_seconds: float = 120.0  # a lease not renewed for this long belongs to a dead run and may be taken over
    storage_options: dict = field(default_factory=dict, repr=False)  # may hold credentials: never printed
    all_candidates: bool = False  # collect mode: render every candidate, ignore the policy
    save_images: bool = True
    sample: float | None = None  # keep this stable fraction of prompts (by prompt id hash), e.g. for a training set
    budget: float | None = None  # budget policy: average renders per prompt (--keep is then the most per prompt)
    budget_images: int | None = None  # or a total for the corpus, turned into renders per prompt by a counting pass
    preview: int | None = None  # preview policy: candidates (of N, the predictor's best) that run the first steps
    preview_steps: int | None = None  # preview policy: steps each of them runs before the best one continues
    # One actor scores and renders (actors/stages/local.py): None decides by the cluster (one node, no GPU, one
    # generator and one scorer); the API and the tests may force either graph.
    one_actor: bool | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for anything that would fail later; touches no model and no storage."""
        problems = []
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            problems.append(f"--candidates must be between 1 and {MAX_CANDIDATES:,} (got {self.candidates:,})")
        if self.keep < 1:
            problems.append(f"--keep must be at least 1 (got {self.keep})")
        if self.candidates >= 1 and self.keep > self.candidates:
            problems.append(f"--keep {self.keep} is more than --candidates {self.candidates}; keep at most N")
        if self.policy not in POLICIES:
            problems.append(f"--policy {self.policy!r} is unknown; use one of {', '.join(POLICIES)}")
        from actors.models.solvers import SCHEDULERS, SEARCHED, is_schedule_file

        if self.scheduler not in SCHEDULERS and self.scheduler != SEARCHED and not is_schedule_file(self.scheduler):
            problems.append(f"--scheduler {self.scheduler!r} is unknown; use one of {', '.join(SCHEDULERS)}, "
                            f"{SEARCHED} (a shipped searched schedule), or schedule:PATH for a searched schedule.json")
        if self.steps < 1:
            problems.append(f"--steps must be at least 1 (got {self.steps})")
        if self.guidance < 0:
            problems.append(f"--guidance must be 0 or more (got {self.guidance})")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % 8):
                problems.append(f"--{name} must be a positive multiple of 8 (got {value})")
        for name in ("batch_size", "generators", "scorers", "scorer_batch_size", "shard_size", "shard_images"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.shard_size >= 1 << 24:
            problems.append(f"--shard-size must be below {1 << 24:,} rows (got {self.shard_size})")
        if self.dedup_buckets is not None and not 1 <= self.dedup_buckets <= 256:
            problems.append(f"--dedup-buckets must be between 1 and 256 (got {self.dedup_buckets})")
        if self.lease_seconds < 10:
            problems.append(f"--lease-seconds must be at least 10 (got {self.lease_seconds})")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be at least 1 (got {self.limit})")
        if self.sample is not None and not 0 < self.sample <= 1:
            problems.append(f"--sample must be in (0, 1] (got {self.sample})")
        if self.image_format not in IMAGE_FORMATS:
            problems.append(f"--image-format {self.image_format!r} is unknown; use {', '.join(IMAGE_FORMATS)}")
        if self.image_output not in IMAGE_OUTPUTS:
            problems.append(f"--image-output {self.image_output!r} is unknown; use {' or '.join(IMAGE_OUTPUTS)}")
        if self.uses_predictor and not self.predictor and not self.model.startswith("embedded:"):
            problems.append(f"--policy {self.policy} needs --predictor PATH for a model that is not embedded")
        problems += self._preview_problems()
        problems += self._attention_problems()
        if self.policy == "budget":
            if (self.budget is None) == (self.budget_images is None):
                problems.append("--policy budget needs one of --budget (renders per prompt) or --budget-images")
            elif self.budget is not None and not 1 <= self.budget <= self.keep:
                problems.append(f"--budget {self.budget} must be between 1 and --keep {self.keep} (the most per prompt)")
            elif self.budget_images is not None and self.budget_images < 1:
                problems.append(f"--budget-images must be at least 1 (got {self.budget_images})")
        elif self.budget is not None or self.budget_images is not None:
            problems.append("--budget and --budget-images go with --policy budget")
        problems += _model_problems(self.model)
        problems += _rater_problems(self.rater)
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))

    def _attention_problems(self) -> list[str]:
        from actors.models.attention_plan import MODES, AttentionPlan

        if self.attention not in MODES:
            return [f"--attention {self.attention!r} is unknown; use one of {', '.join(MODES)}"]
        try:
            plan = AttentionPlan.resolve(self.attention, self.attention_density, self.attention_full_steps,
                                         max(1, self.steps))
        except ValueError as exc:
            return [str(exc)]
        if plan.sparse and self.policy == "preview":
            return [f"--attention {self.attention} with --policy preview: a preview pauses each denoising and "
                    "continues only the best candidate, and sparse attention's caches from the last full step hold "
                    "one row per previewed candidate; they are not sliced to the one that continues. Use --attention "
                    "full with --policy preview"]
        return []

    def _preview_problems(self) -> list[str]:
        if self.policy != "preview":
            return ["--preview and --preview-steps go with --policy preview"] if (
                self.preview is not None or self.preview_steps is not None) else []
        problems = []
        if self.keep != 1:
            problems.append(f"--policy preview continues the best preview of each prompt: use --keep 1 (got {self.keep})")
        if not 1 <= self.preview_count <= max(1, self.candidates):
            problems.append(f"--preview must be between 1 and --candidates {self.candidates} (got {self.preview_count})")
        if not 1 <= self.preview_step_count < self.steps:
            problems.append(f"--preview-steps must be at least 1 and below --steps {self.steps} "
                            f"(got {self.preview_step_count})")
        return problems

    @property
    def preview_count(self) -> int:
        """Candidates previewed per prompt (--preview, default PREVIEW_CANDIDATES or N if fewer)."""
        return self.preview if self.preview is not None else min(PREVIEW_CANDIDATES, self.candidates)

    @property
    def preview_step_count(self) -> int:
        """Steps of each preview (--preview-steps, default a quarter of --steps)."""
        return self.preview_steps if self.preview_steps is not None else max(1, self.steps // PREVIEW_SHARE)

    @property
    def policy_name(self) -> str:
        """The policy as manifests record it: collect renders every candidate ("all")."""
        return "all" if self.all_candidates else self.policy

    @property
    def rows_per_prompt(self) -> int:
        """The most rows the scorer keeps for one prompt."""
        return self.candidates if self.all_candidates else self.keep

    @property
    def uses_predictor(self) -> bool:
        """Whether candidates are ranked by the predictor (a preview of all N candidates needs none)."""
        if self.all_candidates or self.policy == "random":
            return False
        return self.policy != "preview" or self.preview_count < self.candidates

    def fingerprint_fields(self) -> dict:
        """What the user chose that decides which images a run produces; the plan adds the resolved image size and
        the predictor's weights digest. Never a value derived from the corpus, so a corpus that grows between
        scheduled runs keeps its fingerprint."""
        from actors.models.seeds import SEED_VERSION

        fields = {
            "model": self.model,
            "candidates": self.candidates,
            "keep": self.keep,
            "policy": self.policy_name,
            "predictor": None,  # the plan puts the weights digest here
            "steps": self.steps,
            "guidance": self.guidance,
            "scheduler": self.scheduler,
            "seeds": SEED_VERSION,
            "width": self.width,
            "height": self.height,
            "rater": self.rater,
            "seed": self.seed,
            "image_format": self.image_format,
            "sample": self.sample,
            "budget": self.budget,
            "budget_images": self.budget_images,
        }
        if self.policy == "preview":  # only then, so outputs of other policies keep the fingerprint they had
            fields["preview"] = [self.preview_count, self.preview_step_count]
        return fields

    def layout_fields(self) -> dict:
        """How the output is laid out: fixed for its life, checked apart from the fingerprint."""
        return {"shard_size": self.shard_size, "image_output": self.image_output,
                "shard_images": self.shard_images if self.image_output == "shards" else None}

    def public_dict(self) -> dict:
        """The configuration without secrets, for run.json, summaries and logs."""
        values = dataclasses.asdict(self)
        values["storage_options"] = sorted(self.storage_options)  # option names only, never their values
        return values


def fingerprint_of(fields: dict) -> str:
    text = json.dumps(fields, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _rater_problems(spec: str) -> list[str]:
    """The rater spec parses and names files that exist (no model is loaded)."""
    from actors.raters.specs import validate_rater_spec  # lazy: start-up time of every job that builds a config

    try:
        validate_rater_spec(spec)
    except ValueError as exc:
        return [f"--rater {spec}: {exc}"]
    return []


def _model_problems(model: str) -> list[str]:
    if model.startswith("embedded:"):
        from actors.models.embedded import embedded_names

        name = model.split(":", 1)[1]
        if name not in embedded_names():
            return [f"--model {model}: unknown embedded model; use one of "
                    + ", ".join(f"embedded:{n}" for n in embedded_names())]
        return []
    if looks_like_local_path(model):
        folder = os.path.expanduser(model)
        if not os.path.isdir(folder):
            return [f"--model {model}: no such folder; give a diffusers pipeline folder or a hub id (owner/name)"]
        if not os.path.exists(os.path.join(folder, "model_index.json")):
            return [f"--model {model}: the folder has no model_index.json; save the pipeline with save_pretrained"]
    return []
