"""The run's Ray Data graph: read, duplicate filter, score, render (or both in one actor), rate, sink; and the
compaction tasks that run beside the stream, one per completed shard."""

from __future__ import annotations

import logging

import ray

from actors.stages.generator import GeneratorStage
from actors.stages.local import ScoreAndRenderStage
from actors.stages.rater import RaterStage
from actors.stages.scorer import ScorerStage
from orchestrator.corpus.dedup import IndexActors, Owners, bucket_count, drop_duplicates, start_index
from orchestrator.corpus.reader import READ_CPUS, Corpus, read_corpus
from orchestrator.flow.resources import STAGE_RESTARTS, Resources
from orchestrator.flow.state import OutputState
from orchestrator.output.manifest import Manifest, ShardRecord
from orchestrator.output.sink import write_unit
from orchestrator.run.config import GenerateConfig
from orchestrator.run.plan import RunPlan

logger = logging.getLogger("seedsift")


def rebatch(ds, rows: int, num_cpus: float):
    """`ds.repartition(target_num_rows_per_block=rows)`, its tasks asking for `num_cpus` like every light stage.

    Ray Data's repartition takes no resource arguments, and its tasks' default, one whole CPU, cannot be placed
    beside a run's actors on a small cluster: on a fresh 2-CPU `ray start --head` the run waited for ever for that
    CPU (tests/test_cluster.py runs it on a real 1-CPU head). The logical operator keeps its remote arguments
    in a dict, set here; Ray is pinned below 2.64 in pyproject.toml, and the assertion names a Ray that changed it."""
    out = ds.repartition(target_num_rows_per_block=rows)
    operator = out._logical_plan.dag
    assert type(operator).__name__ == "StreamingRepartition" and isinstance(operator.ray_remote_args, dict), operator
    operator.ray_remote_args["num_cpus"] = num_cpus
    return out


def build_dataset(plan: RunPlan, manifest: Manifest, state: OutputState, corpus: Corpus, indexes: IndexActors,
                  owners: Owners, resources: Resources):
    """The lazy Ray dataset of a run: one accounting row per row that reached the sink."""
    config = plan.config
    # Scorer actors on any node get the predictor from the object store, not from a path only the driver sees.
    predictor_ref = ray.put(plan.predictor.files) if plan.predictor else None
    ds = read_corpus(corpus.files, plan.reading, state.complete_frames(), corpus.limits, num_cpus=resources.light_cpus)
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


def start_stream(plan: RunPlan, corpus: Corpus, manifest: Manifest, state: OutputState, resources: Resources):
    """The duplicate index, loading from the output, and the run's dataset; returns (dataset, index actors)."""
    owners = state.owners(corpus.files)
    indexes = start_index(manifest, owners, sorted(state.records), state.open_parts, index_buckets(plan, state),
                          resources.light_cpus)
    return build_dataset(plan, manifest, state, corpus, indexes, owners, resources), indexes



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
