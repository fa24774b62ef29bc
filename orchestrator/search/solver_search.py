"""The solver search (S³): an evolutionary search over solver schedules with exactly K model calls, its candidates
evaluated in parallel by a pool of SolverEvaluator actors (actors/stages/solver_evaluator.py).

The objective is declared up front and recorded in the result: the mean latent RMSE, over the training prompts and
seeds, to a reference of the same noises (DPM-Solver++ at many steps), lower is better; with a rater, a guard: a
candidate whose mean rater score falls below the better of DPM-Solver++ and UniPC at K calls by more than two
standard errors is infeasible (closer to the reference is not the same as rated better). S³'s idea where it pays:
each generation proposes several times more mutants than it evaluates, and a ridge regression of the objective on
the schedules evaluated so far ranks them first (`--no-surrogate` evaluates the first proposals instead).

Resumable: every evaluation is written to OUT/search/evaluations.jsonl as it arrives, and each generation's
proposals follow from the seed and the evaluations before it, so a rerun after a kill re-evaluates only what was in
flight and ends where an uninterrupted search ends. The result, OUT/schedule.json, is data (ScheduleFile).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from actors.models.unified_solver import (ScheduleFile, SolverSchedule, StepDecision, dpm_solver_pp_schedule,
                                          solver_model_identity, solver_timesteps, unipc_schedule)
from orchestrator.output.storage import Output
from orchestrator.run.config import ConfigError

logger = logging.getLogger("seedsift")
SEARCH_FOLDER = "search"
SETTINGS_FILE = f"{SEARCH_FOLDER}/settings.json"
EVALUATIONS_FILE = f"{SEARCH_FOLDER}/evaluations.jsonl"
REFERENCE_FILE = f"{SEARCH_FOLDER}/reference.safetensors"
RESULT_FILE = "schedule.json"
RIDGE = 1e-2  # the surrogate's ridge penalty, on standardised features


@dataclass(frozen=True)
class SearchSettings:
    """Everything that decides a search's result (a resume with other settings is refused)."""

    model: str
    steps: int  # K: model calls of every candidate
    prompts: tuple[str, ...]  # training prompts
    holdout: tuple[str, ...]  # held-out prompts, for the result's figures only
    seeds_per_prompt: int = 2
    guidance: float = 7.5
    height: int = 64
    width: int = 64
    rater: str = ""
    reference_steps: int = 100
    population: int = 8  # parents kept per generation
    offspring: int = 8  # true evaluations per generation after the first
    proposals: int = 4  # mutants proposed per evaluation, ranked by the surrogate
    generations: int = 4
    surrogate: bool = True
    seed: int = 0

    def check(self) -> None:
        problems = []
        if not 2 <= self.steps <= 50:
            problems.append(f"--steps must be 2 to 50 model calls (got {self.steps})")
        if not self.prompts:
            problems.append("--prompts: no usable prompt")
        if self.reference_steps <= self.steps:
            problems.append(f"--reference-steps {self.reference_steps} must be more than --steps {self.steps}")
        for name in ("seeds_per_prompt", "population", "offspring", "proposals", "generations"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if problems:
            raise ConfigError("invalid search:\n  - " + "\n  - ".join(problems))

    def seeds(self, holdout: bool = False) -> list[int]:
        """One seed per (prompt, repeat) pair; the held-out seeds never meet the training ones."""
        base = 1_000_003 if holdout else 0
        count = len(self.holdout if holdout else self.prompts)
        return [self.seed * 7919 + base + i for i in range(count * self.seeds_per_prompt)]


# ---- the search space -----------------------------------------------------------------------------------------


def repaired(steps: list[StepDecision], top: float = 999.0) -> SolverSchedule:
    """A schedule that can run from any mutated decisions: orders within what came before, the last step a data
    step of order 1 unless it has the final corrector (then it ends above noise level zero and may be anything),
    timesteps strictly decreasing by at least 1, the analytic first step only on step 0 below the top timestep."""
    fixed = []
    for i, step in enumerate(steps):
        timestep = float(step.timestep) if i == 0 else min(float(step.timestep), fixed[-1].timestep - 1.0)
        last = i == len(steps) - 1 and not step.corrector
        timestep = round(max(timestep, 1.0 + (len(steps) - 1 - i)), 1)
        fixed.append(StepDecision(timestep=timestep, prediction="data" if last else step.prediction,
                                  order=1 if last else max(1, min(step.order, i + 1, 3)),
                                  derivative=step.derivative, corrector=step.corrector,
                                  analytic=step.analytic and i == 0 and timestep < top))
    return SolverSchedule(tuple(fixed))


def mutant(parent: SolverSchedule, rng: np.random.Generator, top: float) -> SolverSchedule:
    """One to three random changes: a timestep moved (within its neighbours), a decision flipped. The last step's
    corrector costs a call, so turning it on merges two steps and turning it off splits the last one: the number
    of model calls stays the parent's."""
    steps = list(parent.steps)
    for _ in range(int(rng.integers(1, 4))):
        count = len(steps)
        i = int(rng.integers(0, count))
        step = steps[i]
        kind = rng.choice(["timestep", "timestep", "prediction", "order", "derivative", "corrector", "analytic"])
        if kind == "timestep":
            upper = top if i == 0 else steps[i - 1].timestep - 1.0
            lower = 1.0 if i == count - 1 else steps[i + 1].timestep + 1.0
            if upper > lower:
                middle = step.timestep + rng.normal(0.0, 0.25) * (upper - lower)
                step = dataclasses.replace(step, timestep=float(np.clip(middle, lower, upper)))
        elif kind == "prediction":
            step = dataclasses.replace(step, prediction="noise" if step.prediction == "data" else "data")
        elif kind == "order":
            step = dataclasses.replace(step, order=int(rng.integers(1, 4)))
        elif kind == "derivative":
            step = dataclasses.replace(step, derivative="unip" if step.derivative == "dpm" else "dpm")
        elif kind == "analytic":
            step = steps[0]
            i = 0
            step = dataclasses.replace(step, analytic=not step.analytic,
                                       timestep=min(step.timestep, top - 0.25 * (top - steps[1].timestep))
                                       if not step.analytic and count > 1 else step.timestep)
        elif i == count - 1 and count > 1:
            if step.corrector:  # off: the freed call becomes a step halfway down to timestep 0
                steps[i] = dataclasses.replace(step, corrector=False)
                steps.append(StepDecision(timestep=round(step.timestep / 2, 1)))
                continue
            if count < 3:
                continue
            del steps[int(rng.integers(1, count - 1))]  # on: an inner step gives its call to the corrector
            step = dataclasses.replace(step, corrector=True)
            i = len(steps) - 1
        else:
            step = dataclasses.replace(step, corrector=not step.corrector)
        steps[i] = step
    return repaired(steps, top)


def features(schedule: SolverSchedule, top: float) -> np.ndarray:
    """What the surrogate reads of a schedule: each call's timestep (scaled) and decisions, the same length for
    every schedule of K calls (the final corrector's call reads as a corrector at timestep 0)."""
    values = []
    for step in schedule.steps:
        values += [step.timestep / top, step.prediction == "data", step.order / 3, step.derivative == "unip",
                   step.corrector, step.analytic]
    if schedule.final_corrector:
        values += [0.0, 1.0, 1 / 3, 0.0, 1.0, 0.0]
    return np.asarray(values, dtype=np.float64)


class Surrogate:
    """Ridge regression of the objective on schedule features: cheap, and enough to rank mutants."""

    def __init__(self, schedules: list[SolverSchedule], objectives: list[float], top: float):
        x = np.stack([features(s, top) for s in schedules])
        self.mean, self.scale = x.mean(axis=0), x.std(axis=0) + 1e-9
        z = (x - self.mean) / self.scale
        y = np.asarray(objectives, dtype=np.float64)
        self.offset = y.mean()
        self.weights = np.linalg.solve(z.T @ z + RIDGE * len(y) * np.eye(z.shape[1]), z.T @ (y - self.offset))
        self.top = top

    def predict(self, schedules: list[SolverSchedule]) -> np.ndarray:
        z = (np.stack([features(s, self.top) for s in schedules]) - self.mean) / self.scale
        return z @ self.weights + self.offset


# ---- the search -----------------------------------------------------------------------------------------------


@dataclass
class Record:
    schedule: SolverSchedule
    rmse: list[float]
    score: list[float]
    generation: int

    @property
    def objective(self) -> float:
        return float(np.mean(self.rmse))

    @property
    def mean_score(self) -> float | None:
        return float(np.mean(self.score)) if self.score else None

    def to_json(self) -> str:
        return json.dumps({"digest": self.schedule.digest, "generation": self.generation,
                           "schedule": self.schedule.to_dict(), "rmse": self.rmse, "score": self.score})


def standard_error(values: list[float]) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


class SolverSearch:
    """One search into one output folder; `run()` returns the result's dict (also written as schedule.json)."""

    def __init__(self, settings: SearchSettings, out: str, storage_options: dict | None = None,
                 evaluators: int = 1, evaluator_cpus: float = 1.0, say=None, progress=None):
        from actors.models.embedded import resolve_model

        settings.check()
        self.settings = settings
        self.output = Output(out, storage_options or {})
        self.model_path = resolve_model(settings.model)
        self.identity = {"name": settings.model, **solver_model_identity(self.model_path)}
        self.evaluators, self.evaluator_cpus = max(1, evaluators), evaluator_cpus
        self.say = say or logger.warning
        self.progress = progress
        self.records: dict[str, Record] = {}
        from actors.models.unified_solver import UnifiedSolverScheduler

        scheduler_config = dict(UnifiedSolverScheduler.load_config(self.model_path, subfolder="scheduler"))
        self.base_timesteps = solver_timesteps(scheduler_config, settings.steps)
        self.top = float(scheduler_config["num_train_timesteps"] - 1)

    # state ---------------------------------------------------------------------------------------------------

    def _settings_record(self) -> dict:
        return {"settings": dataclasses.asdict(self.settings), "model": self.identity}

    def _open(self) -> None:
        """Start a new search, or resume the one this folder holds (refused if it was for other settings)."""
        record = json.loads(json.dumps(self._settings_record()))
        if self.output.exists(SETTINGS_FILE):
            held = self.output.read_json(SETTINGS_FILE)
            if held != record:
                before = held.get("settings", {})
                changed = sorted(k for k in record["settings"] if before.get(k) != record["settings"][k])
                raise ConfigError(f"{self.output.uri} holds a search with other settings "
                                  f"({', '.join(changed) or 'model'}); rerun with the same ones to resume it, or use "
                                  "a new --out")
            text = self.output.read_bytes(EVALUATIONS_FILE).decode() if self.output.exists(EVALUATIONS_FILE) else ""
            for line in text.splitlines():
                value = json.loads(line)
                schedule = SolverSchedule.from_dict(value["schedule"])
                self.records[schedule.digest] = Record(schedule, value["rmse"], value["score"], value["generation"])
            if self.records:
                self.say(f"seedsift: resuming the search in {self.output.uri}: {len(self.records)} evaluations done")
        else:
            if self.output.top_level():
                raise ConfigError(f"--out {self.output.uri} is not empty and holds no solver search; choose another")
            self.output.write_json(SETTINGS_FILE, record)

    def _save(self) -> None:
        lines = [record.to_json() for record in self.records.values()]
        self.output.write_bytes(EVALUATIONS_FILE, ("\n".join(lines) + "\n").encode())

    # generations ---------------------------------------------------------------------------------------------

    def baselines(self) -> dict[str, SolverSchedule]:
        timesteps = self.base_timesteps
        return {"dpm++": dpm_solver_pp_schedule(timesteps, 2), "unipc": unipc_schedule(timesteps, 2),
                "dpm++3m": dpm_solver_pp_schedule(timesteps, 3), "unipc-3": unipc_schedule(timesteps, 3)}

    def proposals(self, generation: int) -> tuple[list[SolverSchedule], dict]:
        """Generation g's candidates: the baselines and their mutants first, then mutants of the best, ranked by the
        surrogate trained on every evaluation so far. Deterministic given the seed and those evaluations."""
        settings = self.settings
        rng = np.random.default_rng([settings.seed, generation])
        if generation == 0:
            first = list(dict.fromkeys(self.baselines().values()))  # at small K some baselines coincide
            seeds = len(first)
            for _ in range(settings.population * 20):
                if len(first) >= settings.population:
                    break
                child = mutant(first[int(rng.integers(0, seeds))], rng, self.top)
                if child not in first:
                    first.append(child)
            return first, {"proposed": len(first), "evaluated": len(first)}
        earlier = sorted((r for r in self.records.values() if r.generation < generation),
                         key=lambda r: (self.rank_key(r), r.schedule.digest))
        parents = [r.schedule for r in earlier[:settings.population]]
        count = settings.offspring * (settings.proposals if settings.surrogate else 1)
        candidates, seen = [], {r.schedule.digest for r in earlier}
        for _ in range(count * 20):
            if len(candidates) >= count:
                break
            child = mutant(parents[int(rng.integers(0, len(parents)))], rng, self.top)
            if child.digest not in seen:
                seen.add(child.digest)
                candidates.append(child)
        if settings.surrogate and candidates:
            model = Surrogate([r.schedule for r in earlier], [self.penalised(r) for r in earlier], self.top)
            order = np.argsort(model.predict(candidates), kind="stable")
            candidates = [candidates[i] for i in order]
        return candidates[:settings.offspring], {"proposed": len(candidates), "evaluated": settings.offspring}

    def guard(self) -> float | None:
        """The lowest mean rater score a feasible candidate may have (None without a rater)."""
        if not self.settings.rater:
            return None
        named = self.baselines()
        found = [self.records.get(named[name].digest) for name in ("dpm++", "unipc")]
        found = [r for r in found if r is not None and r.score]
        if not found:
            return None
        best = max(found, key=lambda r: r.mean_score)
        return best.mean_score - 2 * standard_error(best.score)

    def feasible(self, record: Record) -> bool:
        floor = self.guard()
        return floor is None or record.mean_score is None or record.mean_score >= floor

    def rank_key(self, record: Record) -> tuple:
        return (not self.feasible(record), record.objective)

    def penalised(self, record: Record) -> float:
        """The surrogate's target: the objective, doubled for an infeasible candidate."""
        return record.objective * (1.0 if self.feasible(record) else 2.0)

    # evaluation ----------------------------------------------------------------------------------------------

    def _start(self, prompts: tuple[str, ...], holdout: bool):
        import ray

        from actors.stages.solver_evaluator import SolverEvaluator

        settings = self.settings
        pairs = [prompt for prompt in prompts for _ in range(settings.seeds_per_prompt)]
        actor = ray.remote(SolverEvaluator).options(num_cpus=self.evaluator_cpus, max_restarts=2,
                                                    max_task_retries=2)
        return [actor.remote(settings.model, pairs, settings.seeds(holdout), settings.guidance, settings.height,
                             settings.width, settings.rater, num_threads=max(1, int(self.evaluator_cpus)))
                for _ in range(self.evaluators)]

    def _reference(self, actors, name: str) -> None:
        """The reference latents, computed once (by the first actor) and kept in OUT/search/ for a resume."""
        import ray
        from safetensors.numpy import load, save

        key = f"{SEARCH_FOLDER}/{name}"
        if self.output.exists(key):
            latents = load(self.output.read_bytes(key))["latents"]
        else:
            self.say(f"seedsift: the reference: DPM-Solver++ at {self.settings.reference_steps} calls")
            latents = ray.get(actors[0].reference_latents.remote(self.settings.reference_steps))
            self.output.write_bytes(key, save({"latents": np.ascontiguousarray(latents)}))
        ray.get([actor.set_reference.remote(latents) for actor in actors])

    def _evaluate(self, actors, schedules: list[SolverSchedule], generation: int) -> None:
        from ray.util import ActorPool

        todo = [s for s in schedules if s.digest not in self.records]
        if not todo:
            return
        by_digest = {s.digest: s for s in todo}
        pool = ActorPool(actors)
        for result in pool.map_unordered(lambda actor, s: actor.evaluate.remote(s.to_dict()), todo):
            self.records[result["digest"]] = Record(by_digest[result["digest"]], result["rmse"], result["score"],
                                                    generation)
            self._save()  # every evaluation lands at once: a kill loses only those in flight
            if self.progress is not None:
                self.progress(1)

    # the whole search ----------------------------------------------------------------------------------------

    def run(self) -> dict:
        from orchestrator.flow.resources import connect_ray

        started = time.time()
        self._open()
        connect_ray(None)
        actors = self._start(self.settings.prompts, holdout=False)
        trail = []
        try:
            self._reference(actors, "reference.safetensors")
            for generation in range(self.settings.generations + 1):
                candidates, counts = self.proposals(generation)
                self._evaluate(actors, candidates, generation)
                best = min(self.records.values(), key=self.rank_key)
                trail.append({"generation": generation, **counts, "evaluations": len(self.records),
                              "best_objective": round(best.objective, 6)})
                self.say(f"seedsift: generation {generation}: best latent RMSE {best.objective:.4f} "
                         f"({len(self.records)} schedules evaluated)")
        finally:
            _stop(actors)
        best = min(self.records.values(), key=self.rank_key)
        figures = {"search": {"trail": trail, "evaluations": len(self.records),
                              "model_calls": len(self.records) * self.settings.steps * len(self.settings.seeds()),
                              "reference_model_calls": self.settings.reference_steps * len(self.settings.seeds()),
                              "seconds": round(time.time() - started, 1)}}
        if self.settings.holdout:
            figures["holdout"] = self._holdout(best.schedule)
        objective = {
            "kind": "latent RMSE to the reference, mean over the training prompts and seeds (lower is better)",
            "reference": f"DPM-Solver++(2M) at {self.settings.reference_steps} model calls, same noises",
            "guard": (f"mean {self.settings.rater} score at least the better of dpm++ and unipc at "
                      f"{self.settings.steps} calls minus 2 standard errors") if self.settings.rater else None,
            "training": {"prompts": len(self.settings.prompts), "seeds_per_prompt": self.settings.seeds_per_prompt,
                         "value": round(best.objective, 6), "score": best.mean_score},
            "settings": dataclasses.asdict(self.settings) | {"prompts": len(self.settings.prompts),
                                                               "holdout": len(self.settings.holdout)},
        }
        result = ScheduleFile(best.schedule, self.identity, objective, figures)
        self.output.write_json(RESULT_FILE, result.to_dict())
        return result.to_dict()

    def _holdout(self, best: SolverSchedule) -> dict:
        """The best schedule against the baselines on held-out prompts and seeds the search never saw."""
        import ray

        actors = self._start(self.settings.holdout, holdout=True)
        named = {"searched": best, **self.baselines()}
        try:
            self._reference(actors, "holdout-reference.safetensors")
            results = ray.get([actors[i % len(actors)].evaluate.remote(s.to_dict())
                               for i, s in enumerate(named.values())])
        finally:
            _stop(actors)
        found = dict(zip(named, results))
        figures = {}
        for name, result in found.items():
            rmse, score = np.asarray(result["rmse"]), result["score"]
            line = {"rmse": round(float(rmse.mean()), 6), "rmse_se": round(standard_error(list(rmse)), 6)}
            if score:
                line |= {"score": round(float(np.mean(score)), 6), "score_se": round(standard_error(score), 6)}
            if name != "searched":
                gap = np.asarray(found["searched"]["rmse"]) - rmse
                line["searched_minus_this"] = round(float(gap.mean()), 6)
                line["paired_se"] = round(standard_error(list(gap)), 6)
            figures[name] = line
        return figures


def _stop(actors) -> None:
    """The evaluators hold a pipeline each: give their resources back as soon as their part is done."""
    import ray

    for actor in actors:
        ray.kill(actor)
