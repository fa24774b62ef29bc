"""Which Ray the run joins (a cluster, or a local instance started as a user's own), and what each stage asks of it:
CPU and GPU requests fitted to the cluster, so a small head never waits for ever."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

from actors.stages.light import give_way_to_generators
from orchestrator.corpus.reader import READ_CPUS
from orchestrator.run.config import GenerateConfig

logger = logging.getLogger("seedsift")


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
