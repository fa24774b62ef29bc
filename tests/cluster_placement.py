"""Multi-node placement check: a CPU-only head plus two GPU workers on one machine; generators must land on GPU nodes.

Run by tests/test_cluster.py in its own process (python tests/cluster_placement.py OUT), never inside pytest's Ray.
Prints one JSON line prefixed with RESULT: for the test to assert on.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script: make the project importable without installing it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(out: str) -> dict:
    # Ray reads these when it starts: auth off for a private test cluster, and the caller's private RAY_TMPDIR
    # keeps this cluster's sockets and its "current cluster" file away from any other Ray on the machine.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from orchestrator import pipeline
    from orchestrator.config import GenerateConfig

    # Explicit ports: the defaults (dashboard 8265, agent 52365) may be held by another Ray on this machine.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2, "num_gpus": 0, "include_dashboard": True, "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
        },
    )
    try:
        gpu_nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": {"SEEDSIFT_CACHE": os.environ["SEEDSIFT_CACHE"]}})
        head_id = cluster.head_node.node_id
        gpu_ids = sorted(node.node_id for node in gpu_nodes)

        summary = pipeline.run(GenerateConfig(
            prompts=str(REPO_ROOT / "examples" / "parti-sample.tsv"), out=out, generators=2, generator_cpus=1,
            limit=8, candidates=2, keep=1, steps=2, address=cluster.address,
        ))

        actors = list_actors(detail=True, limit=1000, raise_on_missing_output=False)
        generators = [
            {"class_name": a.class_name, "node_id": a.node_id, "state": a.state,
             "gpus": (a.required_resources or {}).get("GPU", 0)}
            for a in actors if "GeneratorStage" in (a.class_name or "") + (a.repr_name or "")
        ]
        manifest = pq.read_table(os.path.join(out, "manifest", "shards")).to_pylist()
        return {
            "head_node_id": head_id,
            "gpu_node_ids": gpu_ids,
            "cluster_gpus": ray.cluster_resources().get("GPU", 0),
            "generators": generators,
            "all_actor_classes": sorted({a.class_name for a in actors}),
            "manifest_ok_rows": sum(row["status"] == "ok" for row in manifest),
            "manifest_rows": len(manifest),
            "images_exist": all(os.path.exists(os.path.join(out, row["image_key"]))
                                for row in manifest if row["status"] == "ok"),
            "summary_images": summary["images"],
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print("RESULT:" + json.dumps(main(sys.argv[1])), flush=True)
