"""The pipeline that ties the stages together on Ray Data: read -> dedup -> score -> render -> rate -> sink.

Called by the generate and collect jobs. The driver checks everything it can before Ray starts (configuration,
corpus, output, lease), then streams the run and keeps a ledger of the shards in flight: when every corpus row
of a shard is delivered it compacts the shard into one object. Its memory and its start-up do not grow with
what the output already holds: it reads one footer per complete shard, never their rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass

import ray

from actors.stages import trace
from actors.stages.generator import GeneratorStage
from actors.stages.light import give_way_to_generators
from actors.stages.local import ScoreAndRenderStage
from actors.stages.rater import RaterStage
from actors.stages.scorer import ScorerStage
from orchestrator.corpus.dedup import IndexActors, Owners, bucket_count, drop_duplicates, start_index
from orchestrator.corpus.listing import (Columns, CorpusFile, check_corpus, is_collection, list_corpus,
                                         readable_on_the_driver)
from orchestrator.corpus.reader import READ_CPUS, ReadSettings, corpus_needs_work, file_key, read_corpus, split_limit
from orchestrator.flow.console import STATUS_EVERY_S
from orchestrator.output.lease import Lease
from orchestrator.output.ledger import ShardLedger
from orchestrator.output.manifest import (DELIVERED, LAYOUT_VERSION, RUN_FILE, DamagedManifest, Manifest, ShardRecord,
                                          split_shard_id)
from orchestrator.output.sink import write_unit
from orchestrator.output.storage import Output, storage_error_in
from orchestrator.output.summary import merge_stats, prompt_difficulty, shard_stats
from orchestrator.run.config import ConfigError, GenerateConfig
from orchestrator.run.plan import RunPlan, build_plan

logger = logging.getLogger("seedsift")
SUMMARY_FILE = "summary.json"
ID_SCOPE = "per file"  # run.json's layout["ids"] for outputs begun by this version (see check_run_file)


@dataclass
class OutputState:
    """What the output held when the run started: complete shards (their records) and open parts."""

    records: dict[str, ShardRecord]
    open_parts: dict[str, list[str]]

    @classmethod
    def read(cls, manifest: Manifest) -> OutputState:
        return cls(records=manifest.complete_records(), open_parts=manifest.open_parts())

    @property
    def committed_shards(self) -> frozenset:
        return frozenset(self.records) | frozenset(self.open_parts)

    def owners(self, files: list[CorpusFile]) -> Owners:
        """The file numbering every duplicate-index actor of the run shares: the corpus's files, then any other
        file the output holds rows of (a file since removed from the corpus)."""
        return Owners([file_key(f.name) for f in files] + sorted({split_shard_id(s)[0] for s in self.committed_shards}))

    def complete_frames(self) -> dict[str, dict]:
        """{file key: {shard index: frame}} of complete shards, for the reader to skip."""
        frames: dict[str, dict] = {}
        for shard, record in self.records.items():
            key, index = split_shard_id(shard)
            frames.setdefault(key, {})[index] = record.frame
        return frames

    def delivered_rows(self) -> int:
        return sum(self.delivered_in(shard) for shard in self.records)

    def delivered_in(self, shard: str) -> int:
        return sum(self.records[shard].stats.get("by_status", {}).get(s, 0) for s in DELIVERED)

    def skipped(self, ledger: ShardLedger) -> int:
        """Rows committed before this run that it did not render again: those of complete shards, and those it
        read again and found delivered (open parts, changed shards; a complete shard read again is counted once)."""
        again = ledger.skipped_by_shard
        return (sum(max(self.delivered_in(shard), again.get(shard, 0)) for shard in self.records)
                + sum(n for shard, n in again.items() if shard not in self.records))


@dataclass(frozen=True)
class RunState:
    """One run in flight on the driver, handed on as one object: its plan, its corpus files, the output (manifest
    and lease) and what that output held when the run started."""

    plan: RunPlan
    files: list[CorpusFile]
    manifest: Manifest
    state: OutputState
    lease: Lease
    started: float  # time.time() at the run's start: its wall time in the summary


def prepare(config: GenerateConfig) -> tuple[RunPlan, list[CorpusFile], Manifest]:
    """Everything that can fail before Ray starts: plan (model, size, predictor), corpus files, output."""
    # The corpus first: a wrong column is the commonest first-hour mistake, and this takes a second.
    files = list_corpus(config.prompts, config.storage_options, config.out)
    check_corpus(files, Columns(config.prompt_column, config.id_column), config.storage_options)
    plan = build_plan(config)
    output = Output(config.out, config.storage_options)
    manifest = Manifest(output)
    manifest.check_may_write()  # before the probe below: a folder of someone else's files gets no write at all
    output.check_writable()
    return plan, files, manifest


def check_run_file(manifest: Manifest, plan: RunPlan) -> RunPlan:
    """Refuse to mix two run configurations or two layouts in one output; write run.json for a new output.

    Returns the plan with the output's id scope: an output begun by this version qualifies the ids of a folder or
    glob corpus by their file (layout `ids: per file`); one begun by seedsift 0.2 keeps ids unique across the corpus,
    as it was written (its committed rows must keep matching what the corpus reads as)."""
    output = manifest.output
    previous = manifest.read_run()
    layout = {"version": LAYOUT_VERSION, **plan.config.layout_fields(), "ids": ID_SCOPE}
    collection = is_collection(plan.config.prompts, plan.config.storage_options)
    if previous is None:
        if manifest.legacy_parts():
            raise ConfigError(f"{output.uri} holds manifest parts but no {RUN_FILE}; it is not a seedsift output "
                              "this version can continue. Write to a new --out")
        output.write_json(RUN_FILE, {
            "fingerprint": plan.fingerprint,
            "fingerprint_fields": plan.fingerprint_fields,
            "layout": layout,
            "config": plan.config.public_dict(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        return dataclasses.replace(plan, ids_per_file=collection)
    recorded = previous.get("layout")
    if recorded is None or manifest.legacy_parts():
        raise ConfigError(
            f"{output.uri} was written by seedsift 0.1, which committed one manifest part per 16 rows; this version "
            "keeps a sharded manifest and cannot continue it. Write to a new --out (the old output stays readable: "
            "seedsift verify, reproduce and manifest read it)")
    if recorded.get("version") != LAYOUT_VERSION:
        raise ConfigError(f"{output.uri} has manifest layout {recorded.get('version')}; this seedsift writes "
                          f"layout {LAYOUT_VERSION}. Use the seedsift that wrote it, or a new --out")
    scope = recorded.get("ids", "per corpus")  # 0.2's outputs record none: ids unique across the corpus
    changed = {k: (recorded.get(k), v) for k, v in layout.items() if k != "ids" and recorded.get(k) != v}
    if changed:
        raise ConfigError(f"{output.uri} is laid out with " + ", ".join(f"{k}={a!r}" for k, (a, _) in changed.items())
                          + "; this run asks for " + ", ".join(f"{k}={b!r}" for k, (_, b) in changed.items())
                          + ". An output keeps its layout: rerun with the earlier values, or write to a new --out")
    if previous.get("fingerprint") != plan.fingerprint:
        old, new = previous.get("fingerprint_fields", {}), plan.fingerprint_fields
        changed = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])
        raise ConfigError(
            f"{output.uri} holds a run with another configuration ({changed}); resuming would mix images "
            "from two configurations. Write to a new --out, or rerun with the earlier settings."
        )
    if collection and scope != ID_SCOPE:
        logger.warning("%s was begun by seedsift 0.2: the ids of its corpus stay unique across all its files (a "
                       "repeated id is a duplicate); a new --out scopes them per file", output.uri)
    return dataclasses.replace(plan, ids_per_file=collection and scope == ID_SCOPE)


def connect_ray(address: str | None, log_to_driver: bool = True) -> None:
    """Join the named cluster (or RAY_ADDRESS, set under `ray job submit`), else start a local Ray instance.

    `log_to_driver=False` keeps the workers' output (library warnings, load bars) in Ray's log files.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(address="local", log_to_driver=log_to_driver, **local_ray_options())
        # The driver (and the Ray Data threads it starts from here on) mostly waits: the local generator goes first.
        give_way_to_generators()


def local_ray_options() -> dict:
    """How a run on one machine starts its own Ray (the test suite's session Ray is started the same way)."""
    # Ray starts workers at nice 15; locally the generator is the job, not background work.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Light stages (reading, scoring, rating, writing) mostly wait; two spare logical CPUs let them run beside
    # generators that own every physical core. No dashboard: it costs about a second of start-up and 0.2 GB, and
    # the console shows the run; `ray start --head` and --address give one.
    return {"num_cpus": (os.cpu_count() or 1) + 2, "include_dashboard": False}


# A model-holding stage whose actor dies more often than this (out of memory, a crash in its library) ends the run
# with one line and exit 1, its lease released, instead of Ray restarting it for ever; a rerun resumes.
STAGE_RESTARTS = 3
# Light tasks the cluster must be able to run beside the run's actors: a read or sink task, and a compaction.
TASK_SLOTS = 2


@dataclass(frozen=True)
class Resources:
    """What each stage asks Ray for, fitted to the cluster the run joined. These are Ray's logical CPUs: they decide
    where actors and tasks are placed, not how many threads they use."""

    generator_gpus: float
    generator_cpus: float
    generator_threads: int  # torch threads of a generator, from its unscaled CPUs
    scorer_cpus: float
    rater_cpus: float  # a model rater's actor (a pixel rater works inside the generator)
    light_cpus: float  # each read, duplicate filter, index, sink and compaction task or actor
    scale: float = 1.0  # below 1: every CPU request shrunk by this to fit the cluster
    cluster_cpus: float = 0.0
    one_actor: bool = False  # the scorer inside the generator's actor (actors/stages/local.py), scorer_cpus 0

    def describe(self) -> str:
        scorers = "scoring in the generator" if self.one_actor else f"scorers {self.scorer_cpus:.2g} CPU"
        return (f"generators {self.generator_cpus:.2g} CPU + {self.generator_gpus:g} GPU each, {scorers}, "
                f"rater {self.rater_cpus:.2g} CPU, reading and writing {self.light_cpus:.2g} CPU a task")


def plan_resources(config: GenerateConfig, cluster: dict, buckets: int, model_rater: bool, nodes: int = 1) -> Resources:
    """Per-stage requests: a whole GPU per generator where the cluster has GPUs, else all cores but one; the light
    stages their configured shares. On one node without a GPU, with one generator and one scorer, the scorer works
    inside the generator's actor (actors/stages/local.py) and asks for nothing of its own. When the sum is more than the
    cluster's CPUs (a 2-CPU `ray start --head`, which 0.2 deadlocked: the last read task could never be placed),
    every CPU request is scaled down to fit.

    A CPU generator's CPUs are also its torch threads. The core left over is the light stages': on 2 cores one
    thread renders the tiny pipeline faster (0.19-0.21 s an image) than two (0.20-0.25 s), whose threads stall
    whenever scoring, rating or writing takes a core from one of them (benchmarks/README.md, figure 1).
    """
    gpus = config.generator_gpus
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
        if gpus == 0 and (config.address or os.environ.get("RAY_ADDRESS")):
            # An autoscaling cluster whose GPU workers start at zero shows no GPU yet.
            logger.warning("the cluster has no GPU now, so generators run on CPU; on an autoscaling cluster "
                           "whose GPU workers start at 0, pass --generator-gpus 1 so that GPU nodes are launched")
    cpus = config.generator_cpus
    if cpus is None:
        # A local Ray declares the cores plus two (local_ray_options): the cores less one, shared by the generators.
        cpus = 2.0 if gpus > 0 else max(1.0, (cluster.get("CPU", 1) - 3) // config.generators)
    rater = config.rater_cpus if model_rater else 0.0
    one_actor = config.one_actor
    if one_actor is None:
        one_actor = gpus == 0 and nodes == 1 and config.generators == 1 and config.scorers == 1
    scorer_cpus = 0.0 if one_actor else config.scorer_cpus
    demand = (config.generators * cpus + config.scorers * scorer_cpus + rater
              + (1 + buckets + TASK_SLOTS) * READ_CPUS)
    total = float(cluster.get("CPU", 0))
    # No CPU at all is an autoscaling head whose workers are still to come: ask as configured, and say what waits.
    scale = total / demand if 0 < total < demand else 1.0
    return Resources(generator_gpus=gpus, generator_cpus=cpus * scale, generator_threads=max(1, int(cpus)),
                     scorer_cpus=scorer_cpus * scale, rater_cpus=config.rater_cpus * scale,
                     light_cpus=READ_CPUS * scale, scale=scale, cluster_cpus=total, one_actor=one_actor)


def read_settings(plan: RunPlan) -> ReadSettings:
    config = plan.config
    return ReadSettings(shard_size=config.shard_size, sample=config.sample, storage_options=config.storage_options,
                        columns=Columns(config.prompt_column, config.id_column), ids_per_file=plan.ids_per_file)


def file_limits(config: GenerateConfig, files: list[CorpusFile]) -> dict[str, int] | None:
    return split_limit(files, config.limit, config.storage_options, Columns(config.prompt_column, config.id_column))


def count_usable_prompts(plan: RunPlan, files: list[CorpusFile]) -> int:
    """--budget-images: a counting pass over the corpus (reading only)."""
    config = plan.config
    prompts = 0
    for batch in read_corpus(files, read_settings(plan), limits=file_limits(config, files)
                             ).iter_batches(batch_format="pyarrow", batch_size=None):
        prompts += batch["status"].to_pylist().count("ok")
    return prompts


def rebatch(ds, rows: int, num_cpus: float):
    """`ds.repartition(target_num_rows_per_block=rows)`, its tasks asking for `num_cpus` like every light stage.

    Ray Data's repartition takes no resource arguments, and its tasks' default, one whole CPU, cannot be placed
    beside a run's actors on a small cluster: on a fresh 2-CPU `ray start --head` the run waited for ever for that
    CPU (tests/test_cluster.py runs it on real 1- and 2-CPU heads). The logical operator keeps its remote arguments
    in a dict, set here; Ray is pinned below 2.64 in pyproject.toml, and the assertion names a Ray that changed it."""
    out = ds.repartition(target_num_rows_per_block=rows)
    operator = out._logical_plan.dag
    assert type(operator).__name__ == "StreamingRepartition" and isinstance(operator.ray_remote_args, dict), operator
    operator.ray_remote_args["num_cpus"] = num_cpus
    return out


def build_dataset(plan: RunPlan, manifest: Manifest, state: OutputState, files: list[CorpusFile], indexes: IndexActors,
                  owners: Owners, resources: Resources):
    """The lazy Ray dataset of a run: one accounting row per row that reached the sink."""
    config = plan.config
    # Scorer actors on any node get the predictor from the object store, not from a path only the driver sees.
    predictor_ref = ray.put(plan.predictor.files) if plan.predictor else None
    ds = read_corpus(files, read_settings(plan), state.complete_frames(), file_limits(config, files),
                     num_cpus=resources.light_cpus)
    # Later copies of a prompt id or text become quarantined rows.
    ds = drop_duplicates(ds, indexes, manifest, owners, resources.light_cpus)
    # Reading and duplicate detection work in shard-sized blocks (cheap per row); the scorer gets blocks of one call
    # each, because a map task emits its output only when its input block is done: a 10,000-row block would hold
    # back the first render until 10,000 prompts were embedded.
    scoring, rendering = plan.scoring, plan.rendering
    ds = rebatch(ds, scoring.prompts_per_call, resources.light_cpus)
    images_per_row = max(1, rendering.preview)  # a preview row carries its prompt's M candidates
    rows_per_batch = max(1, config.batch_size // images_per_row)  # --batch-size counts images
    scorer_kwargs = dict(predictor_files=[predictor_ref], manifest=manifest, committed_shards=state.committed_shards)
    if resources.one_actor:  # one machine, no GPU: scoring and rendering in one actor (actors/stages/local.py)
        ds = ds.map_batches(
            ScoreAndRenderStage,
            fn_constructor_args=(scoring, rendering),
            fn_constructor_kwargs=dict(rows_per_batch=rows_per_batch, num_threads=resources.generator_threads,
                                       **scorer_kwargs),
            batch_format="numpy", batch_size=scoring.prompts_per_call, compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=resources.generator_cpus, max_restarts=STAGE_RESTARTS,
        )
    else:
        ds = ds.map_batches(
            ScorerStage,
            fn_constructor_args=(scoring,),
            fn_constructor_kwargs=dict(num_threads=max(1, int(config.scorer_cpus)), **scorer_kwargs),
            batch_format="numpy", batch_size=scoring.prompts_per_call,
            compute=ray.data.ActorPoolStrategy(size=config.scorers),
            num_cpus=resources.scorer_cpus, max_restarts=STAGE_RESTARTS,
        )
        ds = ds.map_batches(
            GeneratorStage,
            fn_constructor_args=(rendering,),
            fn_constructor_kwargs=dict(num_threads=resources.generator_threads),
            batch_format="numpy", batch_size=rows_per_batch,
            compute=ray.data.ActorPoolStrategy(size=config.generators),
            num_cpus=resources.generator_cpus, num_gpus=resources.generator_gpus, max_restarts=STAGE_RESTARTS,
        )
    if not rendering.rates_images:  # a model rater: its own actor, which may hold a GPU fraction
        ds = ds.map_batches(
            RaterStage,
            fn_constructor_args=(config.rater,),
            fn_constructor_kwargs=dict(num_threads=max(1, int(config.rater_cpus))),
            batch_format="numpy", batch_size=rows_per_batch, compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=resources.rater_cpus, num_gpus=config.rater_gpus, max_restarts=STAGE_RESTARTS,
        )
    return ds.map_batches(
        write_unit,
        fn_kwargs=dict(manifest=manifest, run_fields=plan.run_fields, image_format=config.image_format,
                       image_output=config.image_output, save_images=config.save_images),
        # One unit per generator batch: its images land as soon as they are rendered and rated, and a kill loses at
        # most one batch per generator. (A preview row costs its M previews too: as much denoising as without.)
        batch_format="numpy", batch_size=rows_per_batch,
        num_cpus=resources.light_cpus,
    )


def index_buckets(plan: RunPlan, state: OutputState) -> int:
    committed = state.delivered_rows() + sum(len(p) for p in state.open_parts.values()) * plan.config.batch_size
    return plan.config.dedup_buckets or bucket_count(2 * committed)


def start_stream(plan: RunPlan, files: list[CorpusFile], manifest: Manifest, state: OutputState,
                 resources: Resources):
    """The duplicate index, loading from the output, and the run's dataset; returns (dataset, index actors)."""
    owners = state.owners(files)
    indexes = start_index(manifest, owners, sorted(state.records), state.open_parts, index_buckets(plan, state),
                          resources.light_cpus)
    return build_dataset(plan, manifest, state, files, indexes, owners, resources), indexes


@ray.remote(max_retries=3)
def _compact(manifest: Manifest, shard: str, frame, image_format: str, shard_images: int) -> ShardRecord | None:
    return manifest.compact(shard, frame, image_format, shard_images)


class Compactions:
    """Shard compactions running as Ray tasks beside the stream; at most one at a time per shard."""

    def __init__(self, manifest: Manifest, config: GenerateConfig, num_cpus: float = READ_CPUS):
        self.manifest, self.config, self.num_cpus = manifest, config, num_cpus
        self.running: dict = {}  # ObjectRef -> shard
        self.queued: dict[str, object] = {}  # shard -> frame, waiting for its running compaction
        self.records: dict[str, ShardRecord] = {}

    def submit(self, shard: str, frame=None) -> None:
        if shard in self.running.values():
            self.queued[shard] = frame
            return
        ref = _compact.options(num_cpus=self.num_cpus).remote(self.manifest, shard, frame, self.config.image_format,
                                                             self.config.shard_images)
        self.running[ref] = shard

    def collect(self, wait: bool = False) -> None:
        while self.running:
            ready, _ = ray.wait(list(self.running), num_returns=len(self.running) if wait else 1,
                                timeout=None if wait else 0)
            if not ready:
                return
            for ref in ready:
                shard = self.running.pop(ref)
                record = ray.get(ref)
                if record is not None:
                    self.records[shard] = record
                if shard in self.queued:
                    self.submit(shard, self.queued.pop(shard))


def run(config: GenerateConfig, console=None) -> dict:
    """Run a generate (or collect) job to the end and return its summary, also written to OUT/summary.json.

    `console` (orchestrator.flow.console.Console) shows progress in images; library calls pass none.
    """
    started = time.time()
    trace.mark("driver", "process", trace.process_started())
    trace.mark("driver", "imports done")
    plan, files, manifest = prepare(config)
    lease = Lease(manifest.output, config.lease_seconds)
    lease.acquire(wait=config.wait)  # before Ray: a second run into a held output stops here, in seconds
    try:
        plan = check_run_file(manifest, plan)
        manifest.output.sweep_temporaries()  # left by writers of a killed run; we hold the lease, nobody else writes
        lease.start_heartbeat()
        state = OutputState.read(manifest)
        trace.mark("driver", "checked")
        current = RunState(plan, files, manifest, state, lease, started)
        if nothing_to_render(plan, files, state):  # a rerun with nothing new, an empty corpus: no Ray, no model
            if console is not None:
                console.say("seedsift: nothing to render: every row of the corpus is committed already (or it has "
                            "none)")
            return finish(current, {}, ShardLedger(), None)
        connect_ray(config.address, log_to_driver=console is None or console.verbose)
        trace.mark("driver", "ray up")
        if console is not None:
            console.ray_started()
        if config.policy == "budget" and plan.budget_per_prompt is None:
            current = dataclasses.replace(current, plan=plan.with_budget(count_usable_prompts(plan, files)))
        progress = None if console is None else console.progress(*expected_images(current.plan, files, state))
        return _stream(current, progress, say=console.say if console is not None else None)
    except DamagedManifest as exc:
        raise ConfigError(f"{exc}; `seedsift verify --out {config.out}` names every damaged object, and with "
                          "--repair moves them aside so that this command redoes their rows") from exc
    finally:
        lease.release()


def nothing_to_render(plan: RunPlan, files: list[CorpusFile], state: OutputState) -> bool:
    """True when no corpus row needs work, known before Ray starts: no open parts (failed rows to retry, a shard in
    progress) and every shard complete and unchanged. A corpus too large to read on the driver says False (its read
    tasks find out), so this check never costs a large corpus a second read."""
    config = plan.config
    if state.open_parts or not readable_on_the_driver(files, config.storage_options):
        return False
    return not corpus_needs_work(files, read_settings(plan), state.complete_frames(), file_limits(config, files))


def expected_images(plan: RunPlan, files: list[CorpusFile], state: OutputState) -> tuple[int | None, int, bool]:
    """(images the output will hold, images it holds, whether the total is exact): from a cheap count of the
    corpus (parquet metadata, a line count) and the complete shards' statistics."""
    from orchestrator.corpus.listing import count_rows

    config = plan.config
    rows, exact = count_rows(files, config.storage_options)
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
    ds, indexes = start_stream(plan, run.files, manifest, state, resources)  # the driver holds the index actors
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


class StallWatch:
    """One console line every STATUS_EVERY_S while nothing is committed and some of the run's actors wait to be
    placed: what waits, and what the cluster has free. A run that cannot be placed says so instead of hanging in
    silence (in the terminal, and in `ray job logs` under `ray job submit`)."""

    def __init__(self, ledger: ShardLedger, resources: Resources, say, every: float = STATUS_EVERY_S):
        self.ledger, self.resources, self.say, self.every = ledger, resources, say, every
        self.job = ray.get_runtime_context().get_job_id()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="seedsift-stall-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last = -1
        while not self._stop.wait(self.every):
            rows = self.ledger.totals["rows"]
            if rows == last:
                line = self.describe()
                if line:
                    self.say(line)
            last = rows

    def describe(self) -> str | None:
        waiting, demands = pending_actors(self.job), pending_demands()
        if not waiting and not demands:
            return None
        free, total = ray.available_resources(), ray.cluster_resources()
        have = ", ".join(f"{name} {free.get(name, 0):g} of {total.get(name, 0):g} free" for name in ("CPU", "GPU")
                         if total.get(name) or name == "CPU")
        what = ", ".join(waiting) if waiting else "tasks"
        asks = f" (pending: {'; '.join(demands)})" if demands else ""
        return (f"seedsift: nothing committed for {self.every:.0f} s: waiting for the cluster to place "
                f"{what}{asks}; it has {have}; this run asks for {self.resources.describe()}")


def pending_demands() -> list[str]:
    """Resource requests of tasks and actors the cluster cannot place now, as the autoscaler sees them (`ray
    status`'s "Pending Demands"; read from the GCS, no dashboard needed): "2 x CPU 1", for instance."""
    try:
        from ray._private import worker
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(worker._global_node.gcs_address)
        demands = status.resource_demands.ray_task_actor_demand
    except Exception:  # noqa: BLE001 - the watch only informs; a failed look is no reason to stop a run
        return []
    found = []
    for demand in demands:
        for request in demand.bundles_by_count:
            bundle = " + ".join(f"{name} {amount:g}" for name, amount in sorted(request.bundle.items()))
            found.append(f"{request.count} x {bundle}")
    return found


def pending_actors(job: str) -> list[str]:
    """This job's actors still waiting to be created (a stage that cannot be placed), by class, counted."""
    from collections import Counter

    try:
        table = ray._private.state.actors()  # the GCS actor table: needs no dashboard (a local run has none)
    except Exception:  # noqa: BLE001 - the watch only informs; a failed look is no reason to stop a run
        return []
    names = Counter(info.get("ActorClassName") or "actor" for info in table.values()
                    if info.get("JobID") == job and info.get("State") in ("PENDING_CREATION", "DEPENDENCIES_UNREADY"))
    return [f"{n} x {name}" if n > 1 else name for name, n in sorted(names.items())]


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
