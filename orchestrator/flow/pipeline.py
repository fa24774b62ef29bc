"""The pipeline that ties the stages together on Ray Data: read -> dedup -> score -> render -> rate -> sink.

Called by the generate and collect jobs. The driver checks everything it can before Ray starts (configuration,
corpus, output, lease), then streams the run and keeps a ledger of the shards in flight: when every corpus row
of a shard is delivered it compacts the shard into one object. Its memory and its start-up do not grow with
what the output already holds: it reads one footer per complete shard, never their rows.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import ray

from actors.stages import trace
from orchestrator.corpus.listing import Columns, count_rows
from orchestrator.corpus.reader import Corpus, corpus_needs_work, count_usable_prompts, open_corpus
from orchestrator.flow.graph import Compactions, index_buckets, start_stream
from orchestrator.flow.resources import connect_ray, plan_resources
from orchestrator.flow.stall import StallWatch
from orchestrator.flow.state import OutputState, RunState
from orchestrator.output.lease import Lease
from orchestrator.output.ledger import ShardLedger
from orchestrator.output.manifest import DamagedManifest, Manifest, ShardRecord
from orchestrator.output.storage import Output, storage_error_in
from orchestrator.output.summary import merge_stats, prompt_difficulty, shard_stats
from orchestrator.run.config import ConfigError, GenerateConfig
from orchestrator.run.plan import RunPlan, build_plan

logger = logging.getLogger("seedsift")
SUMMARY_FILE = "summary.json"


def prepare(config: GenerateConfig) -> tuple[RunPlan, Corpus, Manifest]:
    """Everything that can fail before Ray starts: plan (model, size, predictor), corpus files, output."""
    # The corpus first: a wrong column is the commonest first-hour mistake, and this takes a second.
    corpus = open_corpus(config.prompts, Columns(config.prompt_column, config.id_column), config.storage_options,
                         output=config.out, limit=config.limit)
    plan = build_plan(config)
    output = Output(config.out, config.storage_options)
    names = output.top_level()
    manifest = Manifest(output)
    manifest.check_may_write(names)  # before the probe below: a folder of someone else's files gets no write at all
    output.check_writable()
    return plan, corpus, manifest


def run(config: GenerateConfig, console=None) -> dict:
    """Run a generate (or collect) job to the end and return its summary, also written to OUT/summary.json.

    `console` (orchestrator.flow.console.Console) shows progress in images; library calls pass none.
    """
    started = time.time()
    trace.mark("driver", "process", trace.process_started())
    trace.mark("driver", "imports done")
    plan, corpus, manifest = prepare(config)
    lease = Lease(manifest.output, config.lease_seconds)
    lease.acquire(wait=config.wait)  # before Ray: a second run into a held output stops here, in seconds
    try:
        plan = dataclasses.replace(plan, ids_per_file=manifest.begin_run(plan.run_file, corpus.collection))
        manifest.output.sweep_temporaries()  # left by writers of a killed run; we hold the lease, nobody else writes
        lease.start_heartbeat()
        state = OutputState.read(manifest)
        trace.mark("driver", "checked")
        current = RunState(plan, corpus, manifest, state, lease, started)
        # A rerun with nothing new, an empty corpus: no Ray, no model. Open parts are rows to retry or a shard in
        # progress: work.
        if not state.open_parts and not corpus_needs_work(corpus, plan.reading, state.complete_frames()):
            if console is not None:
                console.say("seedsift: nothing to render: every row of the corpus is committed already (or it has "
                            "none)")
            return finish(current, {}, ShardLedger(), None)
        connect_ray(config.address, log_to_driver=console is None or console.verbose)
        trace.mark("driver", "ray up")
        if console is not None:
            console.ray_started()
        if config.policy == "budget" and plan.budget_per_prompt is None:
            current = dataclasses.replace(current, plan=plan.with_budget(count_usable_prompts(corpus, plan.reading)))
        progress = None if console is None else console.progress(*expected_images(current.plan, corpus, state))
        return _stream(current, progress, say=console.say if console is not None else None)
    except DamagedManifest as exc:
        raise ConfigError(f"{exc}; `seedsift verify --out {config.out}` names every damaged object, and with "
                          "--repair moves them aside so that this command redoes their rows") from exc
    finally:
        lease.release()


def expected_images(plan: RunPlan, corpus: Corpus, state: OutputState) -> tuple[int | None, int, bool]:
    """(images the output will hold, images it holds, whether the total is exact): from a cheap count of the
    corpus (parquet metadata, a line count) and the complete shards' statistics."""
    config = plan.config
    rows, exact = count_rows(corpus.files, config.storage_options)
    done = sum(record.stats.get("images", 0) for record in state.records.values())
    if rows is None:
        return None, done, False
    if config.limit is not None:
        rows = min(rows, config.limit)
    if config.sample is not None:
        rows, exact = round(rows * config.sample), False
    per_prompt = plan.budget_per_prompt if config.policy == "budget" and not config.all_candidates else None
    total = round(rows * (per_prompt or config.rows_per_prompt))
    return max(total, done), done, exact and per_prompt is None


def _stream(run: RunState, progress=None, say=None) -> dict:
    plan, manifest, state = run.plan, run.manifest, run.state
    config = plan.config
    say = say or logger.warning
    resources = plan_resources(config, ray.cluster_resources(), index_buckets(plan, state),
                               model_rater=not plan.rendering.rates_images,
                               nodes=sum(1 for node in ray.nodes() if node["Alive"]))
    if resources.scale < 1:
        say(f"seedsift: the cluster has {resources.cluster_cpus:g} CPUs, fewer than this run's stages ask for: their "
            f"CPU requests are scaled by {resources.scale:.2f} to fit ({resources.describe()})")
    compactions = Compactions(manifest, config, resources.light_cpus)
    for shard in sorted(set(state.records) & set(state.open_parts)):
        compactions.submit(shard)  # parts left beside a complete shard by a kill during its compaction
    ds, indexes = start_stream(plan, run.corpus, manifest, state, resources)  # the driver holds the index actors
    trace.mark("driver", "stream built")
    ledger = ShardLedger()
    first_commit = None
    watch = StallWatch(ledger, resources, say)
    try:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            run.lease.check()
            before = dict(ledger.totals)
            for shard, frame in ledger.add(batch):
                compactions.submit(shard, frame)
            if progress is not None:
                progress.update(*(ledger.totals[k] - before[k] for k in ("images", "failed", "quarantined")),
                                per_prompt=plan.config.rows_per_prompt)
            if first_commit is None and ledger.totals["rows"]:
                first_commit = time.time() - trace.process_started()
                trace.mark("driver", "first rows committed")
            compactions.collect()
        compactions.collect(wait=True)
        if progress is not None:
            progress.close()
    except Exception as exc:
        # An index that could not load the output fails the filter's start: say what the load met (a damaged
        # manifest object, the store) rather than the filter's death.
        indexes.wait_loaded()
        # An outage longer than the storage retries: one line naming the output, and the rerun resumes.
        cause = storage_error_in(exc)
        if cause is not None:
            raise cause from exc
        raise
    finally:
        watch.stop()  # whatever ends the stream: no stall line after it
    return finish(run, compactions.records, ledger, first_commit)


def finish(run: RunState, new_records: dict[str, ShardRecord], ledger: ShardLedger,
           first_commit: float | None) -> dict:
    """The run's summary, folded from shard statistics, written to OUT/summary.json."""
    summary_started = time.time()
    summary = summarise(run, new_records, ledger, first_commit)
    summary["this_run"]["summary_s"] = round(time.time() - summary_started, 3)
    run.manifest.output.write_json(SUMMARY_FILE, summary)
    trace.mark("driver", "summary written")
    return summary


def summarise(run: RunState, new_records: dict[str, ShardRecord], ledger: ShardLedger,
              first_commit: float | None) -> dict:
    """Totals over every committed row of the output, folded from shard statistics, plus what this run did."""
    plan, manifest, state, started = run.plan, run.manifest, run.state, run.started
    config = plan.config
    records = {**state.records, **new_records}
    open_shards = sorted(set(manifest.open_parts()) - set(new_records))
    stats = [record.stats for shard, record in records.items() if shard not in open_shards]
    for shard in open_shards:  # shards still open (failed rows, or a grown shard not done): read their parts
        table = manifest.read_shard(shard)
        if table is not None:
            stats.append(shard_stats(table))
    total = merge_stats(stats)
    wall = time.time() - started
    images, prompts = total["images"], total["prompts"]
    # Shards compacted before steps_spent was recorded cost their images times the steps.
    steps_spent = sum(s.get("steps_spent", s.get("images", 0) * config.steps) for s in stats)
    best_of_n_steps = prompts * config.candidates * config.steps
    return {
        "output": manifest.output.uri,
        "run_id": plan.fingerprint,
        "prompts": prompts,
        "prompts_quarantined": total["by_status"].get("quarantined", 0),
        "images": images,
        "failures": total["failures"],
        "candidates_per_prompt": config.candidates,
        "kept_per_prompt": config.rows_per_prompt,
        "denoising_steps_spent": steps_spent,
        "denoising_steps_best_of_n": best_of_n_steps,
        "savings": savings(plan, prompts, steps_spent),
        "prompt_difficulty": prompt_difficulty(total),
        "quarantine_reasons": total["quarantine_reasons"],
        "failure_reasons": total["failure_reasons"],
        # Delivered rows whose corpus line changed or went away since (a re-read shard): kept, and named.
        "outdated_corpus_lines": total["outdated"],
        "score": total["score"],
        "warnings": list(plan.warnings),
        "budget": None if config.policy != "budget" else {
            "renders_per_prompt_target": plan.budget_per_prompt,
            "renders_per_prompt_spent": round(images / prompts, 4) if prompts else 0.0,
            "threshold": plan.budget_rule.threshold if plan.budget_rule else None,
        },
        "shards": {"complete": len(records) - len(set(open_shards) & set(records)), "open": len(open_shards),
                   "shard_size": config.shard_size},
        "this_run": {
            **{k: ledger.totals[k] for k in ("rows", "images", "failed", "quarantined")},
            "skipped_already_committed": state.skipped(ledger),
            "shards_completed": len(new_records),
            "wall_time_s": round(wall, 2),
            "first_commit_s": round(first_commit, 2) if first_commit is not None else None,  # from process start
            "driver_peak_mb": _peak_rss_mb(),
            "images_per_s": round(ledger.totals["images"] / wall, 3) if wall > 0 else 0.0,
        },
    }


def savings(plan: RunPlan, prompts: int, steps_spent: int) -> dict:
    """What the run's steps are compared with. Best-of-N (render all N, keep the best) costs more and also scores
    more, so fewer steps than it are a saving only at equal quality: the predictor's evaluation.json says how many
    renders best-of-n needs on held-out prompts to match its pick (top-1 of the same N); without that, or for other
    policies, no saving is claimed."""
    config = plan.config
    evaluation = plan.predictor.evaluation if plan.predictor else None
    result = {"best_of_n_steps": prompts * config.candidates * config.steps, "equal_quality_steps": None,
              "saved_at_equal_quality": None, "basis": None}
    applies = (config.policy == "predictor" and config.keep == 1 and evaluation
               and evaluation.get("candidates") == config.candidates
               and evaluation.get("renders_for_equal_quality") is not None)
    if applies and prompts and steps_spent:
        renders = float(evaluation["renders_for_equal_quality"])
        equal = prompts * renders * config.steps
        result.update(equal_quality_steps=round(equal), saved_at_equal_quality=1 - steps_spent / equal,
                      renders_for_equal_quality=renders,
                      scores={k: evaluation.get(k) for k in ("predictor_top1_mean", "oracle_best_of_n_mean",
                                                              "random_mean")},
                      basis=f"{plan.predictor.location}/evaluation.json, {evaluation.get('prompts')} held-out prompts")
    return result


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM), in MB; None where /proc is not available."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
