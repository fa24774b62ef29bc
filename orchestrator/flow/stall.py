"""The stall watch: one console line every STATUS_EVERY_S while nothing is committed and some of the run's actors or
tasks wait to be placed, naming what waits and what the cluster has free."""

from __future__ import annotations

import logging
import threading

import ray

from orchestrator.flow.console import STATUS_EVERY_S
from orchestrator.flow.resources import Resources
from orchestrator.output.ledger import ShardLedger

logger = logging.getLogger("seedsift")


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
    """This job's actors still waiting to be placed (a stage the cluster has no room for), by class, counted. An
    actor with a process (Pid) is placed and running its constructor (imports, model load): on a loaded machine that
    can take more than STATUS_EVERY_S, and it is no placement problem, so it is not named."""
    from collections import Counter

    try:
        table = ray._private.state.actors()  # the GCS actor table: needs no dashboard (a local run has none)
    except Exception:  # noqa: BLE001 - the watch only informs; a failed look is no reason to stop a run
        return []
    names = Counter(info.get("ActorClassName") or "actor" for info in table.values()
                    if info.get("JobID") == job and info.get("State") in ("PENDING_CREATION", "DEPENDENCIES_UNREADY")
                    and not info.get("Pid"))
    return [f"{n} x {name}" if n > 1 else name for name, n in sorted(names.items())]
