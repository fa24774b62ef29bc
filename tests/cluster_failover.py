"""Node failover check: a CPU head plus two GPU workers on one machine; one worker is removed while the job runs.

Run by tests/test_faults.py in its own process (python tests/cluster_failover.py OUT), never inside pytest's Ray.
A replacement worker joins a few seconds later, as an autoscaler would add one. Prints one RESULT: JSON line.
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def generator_nodes() -> set[str]:
    """Node ids hosting an alive generator actor, from Ray's public state API (needs the dashboard)."""
    from ray.util.state import list_actors

    actors = list_actors(detail=True, limit=1000, raise_on_missing_output=False,
                         filters=[("state", "=", "ALIVE")])
    return {actor.node_id for actor in actors if "GeneratorStage" in (actor.class_name or "")}


def main(out: str) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator import pipeline
    from orchestrator.config import GenerateConfig

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": True,
                                                              "dashboard_port": free_port()})
    try:
        workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": {"SEEDSIFT_CACHE": os.environ["SEEDSIFT_CACHE"]}})
        corpus = Path(out).parent / "prompts.txt"
        corpus.write_text("\n".join(f"prompt number {i} of the failover test" for i in range(PROMPTS)) + "\n")
        config = GenerateConfig(prompts=str(corpus), out=out, generators=2, generator_cpus=1, candidates=2,
                                keep=KEEP, steps=2, guidance=3.0, batch_size=2, address=cluster.address)
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
        while victim.node_id not in generator_nodes() and thread.is_alive() and time.time() < deadline:
            time.sleep(0.2)
        had_generator = victim.node_id in generator_nodes()
        manifest = Path(out) / "manifest"

        def committed() -> int:
            return sum(1 for _ in manifest.rglob("*.parquet")) if manifest.exists() else 0

        while thread.is_alive() and not committed() and time.time() < deadline:
            time.sleep(0.1)
        committed_before = committed()
        cluster.remove_node(victim)
        removed_at = time.time()
        time.sleep(3)
        cluster.add_node(num_cpus=2, num_gpus=1)  # what an autoscaler does for a lost GPU node
        thread.join(150)
        return {
            "removed_node_had_generator": had_generator,
            "parts_before_removal": committed_before,
            "finished_after_removal_s": round(time.time() - removed_at, 1),
            "finished": not thread.is_alive(),
            "error": outcome.get("error"),
            "summary_images": (outcome.get("summary") or {}).get("images"),
            "expected_rows": PROMPTS * KEEP,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print("RESULT:" + json.dumps(main(sys.argv[1])), flush=True)
