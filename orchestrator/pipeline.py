"""The pipeline that ties the stages together on Ray Data: read -> score -> render -> rate -> sink, streamed.

Called by the generate and collect jobs. The driver validates, plans resources, then only counts committed rows.
"""

from __future__ import annotations

import logging
import os
import time

import pyarrow.compute as pc
import ray

from actors import diffusion
from actors.generator import GeneratorStage
from actors.rater import RaterStage, validate_rater_spec
from actors.scorer import ScorerStage
from orchestrator.config import ConfigError, GenerateConfig
from orchestrator.dedup import drop_duplicates
from orchestrator.embedded import resolve_model
from orchestrator.manifest import row_key
from orchestrator.reader import READ_CPUS, read_corpus
from orchestrator.sink import write_unit
from orchestrator.storage import Output, storage_error_in

logger = logging.getLogger("seedsift")
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"


def prepare(config: GenerateConfig) -> tuple[Output, str]:
    """Everything that can fail before compute: configuration, rater, model folder, output. Returns (output, model path)."""
    config.validate()
    try:
        validate_rater_spec(config.rater)
    except ValueError as exc:
        raise ConfigError(f"--rater {config.rater}: {exc}") from exc
    model_path = resolve_model(config.model)
    default_width, default_height = diffusion.default_image_size(model_path)
    config.width = config.width or default_width
    config.height = config.height or default_height
    try:
        latent_shape = diffusion.latent_shape(model_path, config.height, config.width)
    except ValueError as exc:
        raise ConfigError(f"--width/--height: {exc}") from exc
    if config.policy != "random" and not config.all_candidates:
        config.predictor_digest = _check_predictor(config, model_path, latent_shape)
    output = Output(config.out, config.storage_options)
    output.check_writable()
    _check_run_file(output, config)
    return output, model_path


def budget_rule(config: GenerateConfig, trained) -> dict:
    """The budget policy's threshold, calibrated on the predictor's recorded spreads so that the corpus-average
    renders per prompt meet the budget; prompts stream, so the rule cannot look at the whole corpus first."""
    from orchestrator.budget import calibrate_threshold

    residual_std = float(trained.metrics.get("residual_std", 0.0))
    residual_ratio = float(trained.metrics.get("residual_ratio", 0.0))
    if not trained.spread_quantiles or (residual_std <= 0 and residual_ratio <= 0):
        raise ConfigError("--policy budget: this predictor records no spread quantiles or residual error; "
                          "retrain it with the current `seedsift train`")
    threshold = calibrate_threshold(trained.spread_quantiles, config.budget, config.candidates, config.keep, 1,
                                    residual_std, residual_ratio)
    return {"threshold": threshold, "residual_std": residual_std, "residual_ratio": residual_ratio}


def _check_predictor(config: GenerateConfig, model_path: str, latent_shape: tuple) -> str:
    """Read the predictor once and refuse one trained for another pipeline, before any compute; returns its digest."""
    from orchestrator.predictor import predictor_from_files, read_predictor_files, resolve_predictor, weights_digest

    # Problems raise PredictorMismatch, a ConfigError naming where the predictor was read from.
    location = resolve_predictor(config.predictor, config.model)
    config.predictor_files = read_predictor_files(location, config.model, config.storage_options)
    # Built once here, so a damaged or mismatched predictor stops the run before any actor starts.
    trained = predictor_from_files(config.predictor_files, model_path, config.height, config.width,
                                   source=location).config
    differences = {k: (trained.pipeline.get(k), getattr(config, k)) for k in ("steps", "guidance")
                   if trained.pipeline.get(k) not in (None, getattr(config, k))}
    if differences:
        logger.warning("predictor %s was trained at %s; this run uses other settings: its ranking may be weaker",
                       location, ", ".join(f"{k}={a} (run: {b})" for k, (a, b) in differences.items()))
    if config.policy == "budget" and config.budget is not None:
        config.budget_rule = budget_rule(config, trained)
    return weights_digest(config.predictor_files)


def _check_run_file(output: Output, config: GenerateConfig) -> None:
    """Refuse to mix two run configurations in one output; write run.json for a new output."""
    if output.exists(RUN_FILE):
        previous = output.read_json(RUN_FILE)
        if previous.get("fingerprint") != config.fingerprint():
            old, new = previous.get("fingerprint_fields", {}), config.fingerprint_fields()
            changed = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])
            raise ConfigError(
                f"{output.uri} holds a run with another configuration ({changed}); resuming would mix images "
                "from two configurations. Write to a new --out, or rerun with the earlier settings."
            )
        return
    output.write_json(RUN_FILE, {
        "fingerprint": config.fingerprint(),
        "fingerprint_fields": config.fingerprint_fields(),
        "config": config.public_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def committed_pairs(output: Output) -> set[tuple[str, str]]:
    """Row keys of every committed row that needs no more work (failed rows are retried); a column read."""
    table = output.read_tables(output.list_keys("manifest", ".parquet"), ["prompt_id", "seed", "source", "status"])
    if table is None:
        return set()
    table = table.filter(pc.is_in(table["status"], value_set=pc.cast(["ok", "quarantined"], table["status"].type)))
    columns = [table[name].to_pylist() for name in ("prompt_id", "seed", "source")]
    return {row_key(prompt_id, seed, source) for prompt_id, seed, source in zip(*columns)}


def resolve_image_budget(config: GenerateConfig) -> None:
    """--budget-images: a counting pass over the corpus (reading only) turns the total into renders per prompt."""
    from orchestrator.predictor import read_config

    prompts = 0
    for batch in read_corpus(config.prompts, config.storage_options, config.limit, config.sample).iter_batches(
            batch_format="pyarrow", batch_size=None):
        prompts += batch["status"].to_pylist().count("ok")
    if prompts == 0:
        raise ConfigError(f"--prompts {config.prompts}: no usable prompt to spend --budget-images on")
    config.budget = min(float(config.keep), max(1.0, config.budget_images / prompts))
    logger.info("budget: %d images over %d prompts = %.3f renders per prompt", config.budget_images, prompts,
                config.budget)
    config.budget_rule = budget_rule(config, read_config(config.predictor_files))


def connect_ray(address: str | None) -> None:
    """Join the named cluster (or RAY_ADDRESS, set under `ray job submit`), else start a local Ray instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # Light stages (reading, scoring, rating, writing) mostly wait; two spare logical CPUs let them run
        # beside generators that own every physical core.
        # Ray starts workers at nice 15; locally the generator is the job, not background work.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 2)


def plan_resources(config: GenerateConfig) -> dict:
    """Per-generator GPUs and CPUs: a whole GPU each where the cluster has GPUs, the cores otherwise."""
    resources = ray.cluster_resources()
    gpus = config.generator_gpus
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        if gpus == 0 and (config.address or os.environ.get("RAY_ADDRESS")):
            # An autoscaling cluster whose GPU workers start at zero shows no GPU yet.
            logger.warning("the cluster has no GPU now, so generators run on CPU; on an autoscaling cluster "
                           "whose GPU workers start at 0, pass --generator-gpus 1 so that GPU nodes are launched")
    cpus = config.generator_cpus
    if cpus is None:
        cpus = 2.0 if gpus > 0 else max(1.0, (resources.get("CPU", 1) - 2) // config.generators)
    return {"generator_gpus": gpus, "generator_cpus": cpus}


def scorer_prompts_per_block(config: GenerateConfig) -> int:
    """Prompts per scorer call, sized by the rows it emits (k per prompt, or all N when collecting).

    A generator task renders a whole scorer block before any row moves on: blocks of about one round of generator
    batches commit rows early and spread a small corpus over several generators. Counting rows, not prompts, also
    bounds a block's memory: an SDXL row carries about 1.3 MB of embeddings, so 32 prompts x 20 collected
    candidates would make an 800 MB block.
    """
    rows_per_prompt = config.candidates if config.all_candidates else config.keep
    rows_per_block = min(config.scorer_batch_size, config.batch_size * config.generators)
    return max(1, rows_per_block // rows_per_prompt)


def build_dataset(config: GenerateConfig, output: Output, model_path: str, done: set | None = None):
    """The lazy Ray dataset of committed manifest rows for a run."""
    resources = plan_resources(config)
    identity = diffusion.model_identity(model_path)
    run_fields = {
        "model": config.model,
        "scheduler": identity["scheduler"],
        "steps": config.steps,
        "guidance": config.guidance,
        "width": config.width,
        "height": config.height,
        "policy": "all" if config.all_candidates else config.policy,
        "rater": config.rater,
        "run_id": config.fingerprint(),
    }
    done_ref = ray.put(done or set())
    # Scorer actors on any node get the predictor from the object store, not from a path only the driver sees.
    predictor_ref, predictor_source = None, ""
    if config.predictor_files:
        from orchestrator.predictor import resolve_predictor

        predictor_ref = ray.put(config.predictor_files)
        predictor_source = resolve_predictor(config.predictor, config.model)
    ds = read_corpus(config.prompts, config.storage_options, config.limit, config.sample)
    ds = drop_duplicates(ds, output)  # later copies of a prompt id or text become quarantined rows
    ds = ds.map_batches(
        ScorerStage,
        fn_constructor_args=(config.model,),
        fn_constructor_kwargs=dict(
            run_seed=config.seed, candidates=config.candidates, keep=config.keep, policy=config.policy,
            guidance=config.guidance, height=config.height, width=config.width,
            predictor_files=[predictor_ref], predictor_source=predictor_source,
            all_candidates=config.all_candidates, budget_rule=config.budget_rule,
            num_threads=max(1, int(config.scorer_cpus)), done=[done_ref],
        ),
        batch_format="numpy", batch_size=scorer_prompts_per_block(config),
        compute=ray.data.ActorPoolStrategy(size=config.scorers),
        num_cpus=config.scorer_cpus,
    )
    ds = ds.map_batches(
        GeneratorStage,
        fn_constructor_args=(config.model,),
        fn_constructor_kwargs=dict(
            steps=config.steps, guidance=config.guidance, height=config.height, width=config.width,
            num_threads=max(1, int(resources["generator_cpus"])),
        ),
        batch_format="numpy", batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=config.generators),
        num_cpus=resources["generator_cpus"], num_gpus=resources["generator_gpus"],
    )
    ds = ds.map_batches(
        RaterStage,
        fn_constructor_args=(config.rater,),
        fn_constructor_kwargs=dict(num_threads=max(1, int(config.rater_cpus))),
        batch_format="numpy", batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=config.rater_cpus, num_gpus=config.rater_gpus,
    )
    ds = ds.map_batches(
        write_unit,
        fn_kwargs=dict(output=output, run_fields=run_fields, image_format=config.image_format,
                       save_images=config.save_images),
        batch_format="numpy", batch_size=max(config.batch_size, 16), num_cpus=READ_CPUS,
    )
    return ds


def run(config: GenerateConfig) -> dict:
    """Run a generate (or collect) job to the end and return its summary, also written to OUT/summary.json."""
    started = time.time()
    output, model_path = prepare(config)
    output.sweep_temporaries()  # left by writers of a killed run; runs into one output never overlap
    done = committed_pairs(output)
    connect_ray(config.address)
    if config.policy == "budget" and config.budget is None:
        resolve_image_budget(config)
    ds = build_dataset(config, output, model_path, done)
    this_run = {"rows": 0, "images": 0, "failed": 0, "quarantined": 0}
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            statuses = batch["status"].to_pylist()
            this_run["rows"] += len(statuses)
            this_run["images"] += statuses.count("ok")
            this_run["failed"] += statuses.count("failed")
            this_run["quarantined"] += statuses.count("quarantined")
    except Exception as exc:
        # An outage longer than the storage retries: one line naming the output, and the rerun resumes.
        cause = storage_error_in(exc)
        if cause is not None:
            raise cause from exc
        raise
    wall = time.time() - started
    summary = summarise(output, config, this_run, wall, skipped=len(done))
    output.write_json(SUMMARY_FILE, summary)
    return summary


def summarise(output: Output, config: GenerateConfig, this_run: dict, wall: float, skipped: int) -> dict:
    """Totals over every committed row of the output, plus what this run did."""
    table = output.read_tables(output.list_keys("manifest", ".parquet"),
                               ["prompt_id", "prompt", "seed", "status", "prompt_predicted_mean", "prompt_predicted_std"])
    statuses = table["status"].to_pylist() if table is not None else []
    prompt_ids = table["prompt_id"].to_pylist() if table is not None else []
    seeds = table["seed"].to_pylist() if table is not None else []
    # A failed row whose (prompt_id, seed) was delivered by a later run is history, not a failure.
    delivered, failed, ok_prompts = set(), set(), set()
    quarantined = 0
    for prompt_id, seed, status in zip(prompt_ids, seeds, statuses):
        if status == "quarantined":
            quarantined += 1
            continue
        ok_prompts.add(prompt_id)
        if status == "ok":
            delivered.add((prompt_id, seed))
        elif status == "failed":
            failed.add((prompt_id, seed))
    images = statuses.count("ok")
    difficulty = prompt_difficulty(table) if table is not None else None
    steps_spent = images * config.steps
    best_of_n_steps = len(ok_prompts) * config.candidates * config.steps
    return {
        "output": output.uri,
        "run_id": config.fingerprint(),
        "prompts": len(ok_prompts),
        "prompts_quarantined": quarantined,
        "images": images,
        "failures": len(failed - delivered),
        "candidates_per_prompt": config.candidates,
        "kept_per_prompt": config.candidates if config.all_candidates else config.keep,
        "denoising_steps_spent": steps_spent,
        "denoising_steps_best_of_n": best_of_n_steps,
        "steps_saved_vs_best_of_n": 1 - steps_spent / best_of_n_steps if best_of_n_steps else 0.0,
        "prompt_difficulty": difficulty,
        "budget": None if config.policy != "budget" else {
            "renders_per_prompt_target": config.budget,
            "renders_per_prompt_spent": round(images / len(ok_prompts), 4) if ok_prompts else 0.0,
            "threshold": config.budget_rule["threshold"] if config.budget_rule else None,
        },
        "this_run": {
            **this_run,
            "skipped_already_committed": skipped,
            "wall_time_s": round(wall, 2),
            "images_per_s": round(this_run["images"] / wall, 3) if wall > 0 else 0.0,
        },
    }


def prompt_difficulty(table, listed: int = 10) -> dict | None:
    """Per-prompt feedback from the predictor: how good its seeds look (mean) and how much choosing gains (spread).

    The per-prompt values are in the manifest (prompt_predicted_mean/std); the summary keeps their distribution
    and the prompts worth a look, so it stays small at a million prompts.
    """
    frame = table.select(["prompt_id", "prompt", "prompt_predicted_mean", "prompt_predicted_std"]).to_pandas()
    frame = frame.dropna(subset=["prompt_predicted_mean"]).drop_duplicates("prompt_id")
    if frame.empty:
        return None
    quantiles = [0.1, 0.5, 0.9]

    def listing(rows) -> list[dict]:
        return [{"prompt_id": r.prompt_id, "prompt": r.prompt, "predicted_mean": round(r.prompt_predicted_mean, 4),
                 "predicted_spread": round(r.prompt_predicted_std, 4)} for r in rows.itertuples()]

    return {
        "prompts": len(frame),
        "predicted_mean_quantiles": dict(zip(map(str, quantiles), frame.prompt_predicted_mean.quantile(quantiles).round(4))),
        "predicted_spread_quantiles": dict(zip(map(str, quantiles), frame.prompt_predicted_std.quantile(quantiles).round(4))),
        "hardest_prompts": listing(frame.nsmallest(listed, "prompt_predicted_mean")),
        "most_seed_sensitive_prompts": listing(frame.nlargest(listed, "prompt_predicted_std")),
    }
