"""Placement and failover on one multi-node cluster: a CPU-only head plus two GPU workers on one machine.

Run by tests/test_cluster.py (and scripts/soak.py) in its own process (python tests/cluster_failover.py OUT), never
inside pytest's Ray. Once both generators run, it records where they are (placement: one per GPU worker, none on
the head); then one worker hosting a generator is removed while the job runs, and a replacement worker joins a few
seconds later, as an autoscaler would add one. Prints one RESULT: JSON line for the tests to assert on.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script: make the project importable without installing it

PROMPTS = 12
KEEP = 2
GPU_WORKERS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def generator_actors(alive_only: bool = False) -> list[dict]:
    """The GeneratorStage actors Ray knows of (ever started, unless `alive_only`): each one's node, GPUs and state,
    from Ray's public state API (needs the dashboard)."""
    from ray.util.state import list_actors

    filters = [("state", "=", "ALIVE")] if alive_only else None
    actors = list_actors(detail=True, limit=1000, raise_on_missing_output=False, filters=filters)
    return [{"class_name": a.class_name, "node_id": a.node_id, "state": a.state,
             "gpus": (a.required_resources or {}).get("GPU", 0)}
            for a in actors if "GeneratorStage" in (a.class_name or "") + (a.repr_name or "")]


def main(out: str) -> dict:
    # Ray reads these when it starts: auth off for a private test cluster, and the caller's private RAY_TMPDIR
    # keeps this cluster's sockets and its "current cluster" file away from any other Ray on the machine.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)
    # Each actor pool starts streaming only once all its actors are up: otherwise, on a loaded machine, the generator
    # that started first rendered every row while the other was still importing, the run ended before both were
    # alive, and the removed node had no generator to lose (it happened once in CI, under 43 s of CPU steal).
    os.environ.setdefault("RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S", "120")
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.flow import pipeline
    from orchestrator.output.manifest import Manifest
    from orchestrator.output.storage import Output
    from orchestrator.run.config import GenerateConfig

    # Explicit ports: the defaults (dashboard 8265, agent 52365) may be held by another Ray on this machine.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "include_dashboard": True, "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port()})
    try:
        workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(GPU_WORKERS)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": {"SEEDSIFT_CACHE": os.environ["SEEDSIFT_CACHE"]}})
        placement = {"cluster_gpus": ray.cluster_resources().get("GPU", 0), "head_node_id": cluster.head_node.node_id,
                     "gpu_node_ids": sorted(node.node_id for node in workers)}
        corpus = Path(out).parent / "prompts.txt"
        corpus.write_text("\n".join(f"prompt number {i} of the failover test" for i in range(PROMPTS)) + "\n")
        config = GenerateConfig(prompts=str(corpus), out=out, generators=GPU_WORKERS, generator_cpus=1,
                                candidates=2, keep=KEEP, steps=2, guidance=3.0, batch_size=2, address=cluster.address)
        outcome: dict = {}

        def run():
            try:
                outcome["summary"] = pipeline.run(config)
            except BaseException as exc:
                outcome["error"] = repr(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        victim = workers[1]
        deadline = time.time() + 120
        # Placement: wait until every generator runs, then record each one's node and GPUs (any state: a generator
        # that died and was restarted before the removal would show up as a third).
        while (len(generator_actors(alive_only=True)) < GPU_WORKERS and thread.is_alive()
               and time.time() < deadline):
            time.sleep(0.2)
        placement["generators"] = generator_actors()
        had_generator = victim.node_id in {g["node_id"] for g in generator_actors(alive_only=True)}
        manifest = Path(out) / "manifest"

        def committed() -> int:
            return sum(1 for _ in manifest.rglob("*.parquet")) if manifest.exists() else 0

        while thread.is_alive() and not committed() and time.time() < deadline:
            time.sleep(0.1)
        committed_before = committed()
        cluster.remove_node(victim)
        removed_at = time.time()
        time.sleep(3)
        replacement = cluster.add_node(num_cpus=2, num_gpus=1)  # what an autoscaler does for a lost GPU node
        thread.join(150)
        finished = not thread.is_alive()
        result = {
            **placement,
            "removed_node_id": victim.node_id,
            "removed_node_had_generator": had_generator,
            "replacement_node_id": replacement.node_id,
            "parts_before_removal": committed_before,
            "finished_after_removal_s": round(time.time() - removed_at, 1),
            "finished": finished,
            "error": outcome.get("error"),
            "summary_images": (outcome.get("summary") or {}).get("images"),
            "expected_rows": PROMPTS * KEEP,
        }
        if finished:
            result["generators_after_run"] = generator_actors()
            rows = Manifest(Output(out)).read_all().to_pylist()
            result.update(
                manifest_rows=len(rows), manifest_ok_rows=sum(row["status"] == "ok" for row in rows),
                images_exist=all(os.path.exists(os.path.join(out, row["image_key"]))
                                 for row in rows if row["status"] == "ok"))
        return result
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print("RESULT:" + json.dumps(main(sys.argv[1])), flush=True)
