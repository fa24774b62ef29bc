"""Cluster-shaped runs: a job submitted through Ray's Jobs API, and generator placement and node failover on one
multi-node cluster (tests/cluster_failover.py, run once for both of their tests); cluster.yaml's validation.

Each cluster runs in separate processes with a private RAY_TMPDIR, so it never joins (or stops) the session's Ray
instance or any other Ray on the machine. The tests that start a cluster are marked slow (`pytest -m slow`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.verify import verify_output
from orchestrator.output.storage import Output
from tests.helpers_ray import run_cluster_script, stop_private_ray

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 180
CLUSTER_TIMEOUT_S = 240  # three Ray nodes on one machine, a removal and a replacement
# Kept out of the working_dir upload: the virtualenv alone is gigabytes, outputs and caches are not code.
UPLOAD_EXCLUDES = [".venv", ".git", "out", "outputs", "*.png", "__pycache__", ".pytest_cache", ".ruff_cache"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One model cache for the module's clusters (the session's if the ray_session fixture set one), built once."""
    from actors.models.embedded import resolve_model

    cache = os.environ.get("SEEDSIFT_CACHE") or str(tmp_path_factory.mktemp("seedsift-cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEEDSIFT_CACHE", cache)
        resolve_model("embedded:tiny-sd")
    return cache


def private_cluster_env(model_cache: str) -> dict:
    """Environment for a private Ray: own temp folder, no auth, no inherited address, the venv first on PATH."""
    # Short and under /tmp: Ray's socket paths live below RAY_TMPDIR and Unix sockets allow about 107 characters.
    ray_tmp = tempfile.mkdtemp(prefix="ssr-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        RAY_TMPDIR=ray_tmp,
        RAY_AUTH_MODE="disabled",  # token auth is on by default in Ray 2.60; a throwaway local head needs none
        SEEDSIFT_CACHE=model_cache,
        # A job's entrypoint `python` is resolved on the head's PATH: make it the venv's python, as on a node
        # where Ray and the project are installed into the default interpreter.
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    return env


def stop_private_cluster(env: dict) -> None:
    stop_private_ray(env["RAY_TMPDIR"])
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


@pytest.fixture
def ray_env(model_cache: str) -> Iterator[dict]:
    env = private_cluster_env(model_cache)
    yield env
    stop_private_cluster(env)


def start_head(env: dict, log_path: Path, cpus: int) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` in its own session; returns the process and the dashboard (Jobs API) address."""
    dashboard_port = free_port()
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--num-cpus={cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        # Every fixed default port (6379, 8265, 10001, 52365) may be held by another Ray on this machine.
        f"--port={free_port()}", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
    ]
    log = open(log_path, "wb")
    head = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return head, f"http://127.0.0.1:{dashboard_port}"


def wait_for_jobs_api(address: str, head: subprocess.Popen, log_path: Path, timeout: float = 90):
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout
    while True:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            return JobSubmissionClient(address)
        except Exception:
            if time.time() > deadline:
                pytest.fail(f"the Jobs API at {address} did not answer in {timeout} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)


@pytest.mark.slow
def test_generate_job_through_jobs_api(ray_env: dict, tmp_path: Path) -> None:
    """A fresh `ray start --head` and a job submitted through the Jobs API, as the product card's first use: 0.2 hung
    for ever on a 2-CPU head with 12 prompts (its stages asked for more CPU than the head had). Here the head has one
    CPU, tighter than the case that hung, and the same 12 prompts: the run's stages are fitted to the cluster, so it
    finishes, and `ray job logs` shows what a terminal shows. (The fitted requests at 1, 2 and 4 CPUs:
    test_safe_defaults.py::test_a_run_asks_for_no_more_cpus_than_the_cluster_has; a head of its own costs about 40
    CPU-seconds, so one size runs for real.)"""
    from ray.job_submission import JobStatus

    cpus, prompts = 1, 12
    started = time.time()
    out = tmp_path / "out"
    log_path = tmp_path / "head.log"
    head, address = start_head(ray_env, log_path, cpus)
    try:
        client = wait_for_jobs_api(address, head, log_path)
        job_id = client.submit_job(
            entrypoint=(f"python -m jobs.generate --prompts examples/parti-sample.tsv --out {out} "
                        f"--limit {prompts} --candidates 3 --keep 1 --steps 2"),
            runtime_env={
                "working_dir": str(REPO_ROOT),
                "excludes": UPLOAD_EXCLUDES,
                "env_vars": {"SEEDSIFT_CACHE": ray_env["SEEDSIFT_CACHE"]},
            },
        )
        deadline = time.time() + JOB_TIMEOUT_S
        status = client.get_job_status(job_id)
        while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
            time.sleep(2)
            status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if status != JobStatus.SUCCEEDED:
            client.stop_job(job_id)
        try:  # Ray's reason (the entrypoint's exit code, a supervisor's death), if it can still say
            info = client.get_job_info(job_id)
            reason = f"{info.message}; driver exit code {info.driver_exit_code}"
        except Exception as exc:  # noqa: BLE001 - the logs below still matter
            reason = f"no job info: {exc!r}"
        assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status} ({reason}):\n{logs[-4000:]}"
    finally:
        stop_private_ray(ray_env["RAY_TMPDIR"], roots=[head.pid])
    print(f"jobs API test ({cpus} CPUs): {time.time() - started:.1f} s")

    manifest = pq.read_table(out / "manifest" / "shards").to_pylist()
    ok = [row for row in manifest if row["status"] == "ok"]
    assert len(ok) == prompts, manifest
    assert len({row["prompt_id"] for row in ok}) == prompts
    for row in ok:
        assert (out / row["image_key"]).is_file(), row["image_key"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == prompts and summary["failures"] == 0
    # `ray job logs` shows what a terminal shows, in lines: a status line in images and the short summary.
    assert re.search(rf"seedsift: images {prompts}/{prompts}, [\d.]+/s.*; 0 failed, 0 quarantined", logs), \
        logs[-3000:]
    assert f"done: {prompts} images for {prompts} prompts in the output" in logs, logs[-3000:]
    assert "Running Dataset" not in logs, logs[-3000:]


@pytest.fixture(scope="module")
def cluster_run(model_cache: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run on a CPU-only head plus two GPU workers (tests/cluster_failover.py) for the placement and the failover
    tests: where the generators were once both ran, then a worker hosting one removed mid-run and replaced."""
    env = private_cluster_env(model_cache)
    out = tmp_path_factory.mktemp("cluster") / "out"
    started = time.time()
    try:
        result = run_cluster_script("cluster_failover.py", out, env, CLUSTER_TIMEOUT_S)
    finally:
        stop_private_cluster(env)
    print(f"cluster run (placement and failover): {time.time() - started:.1f} s")
    return {"result": result, "out": out}


@pytest.mark.slow
def test_generators_land_on_gpu_nodes(cluster_run: dict) -> None:
    result = cluster_run["result"]
    assert result["cluster_gpus"] == 2
    generators = result["generators"]  # every generator the run had started before the removal, in any state
    assert len(generators) == 2, generators
    assert {g["node_id"] for g in generators} == set(result["gpu_node_ids"]), "one generator per GPU worker node"
    assert all(g["gpus"] == 1 for g in generators), generators
    assert result["head_node_id"] not in {g["node_id"] for g in generators}
    # The replacement generator (after the removal) also went to a GPU worker, never to the head.
    gpu_nodes = set(result["gpu_node_ids"]) | {result["replacement_node_id"]}
    after = result.get("generators_after_run", [])
    assert after and {g["node_id"] for g in after} <= gpu_nodes, after
    assert all(g["gpus"] == 1 for g in after), after
    expected = result["expected_rows"]
    assert result.get("manifest_ok_rows") == expected and result.get("manifest_rows") == expected, result
    assert result.get("images_exist") and result["summary_images"] == expected, result


@pytest.mark.slow
def test_removed_worker_node_the_job_still_finishes(cluster_run: dict) -> None:
    result = cluster_run["result"]
    assert result["removed_node_had_generator"], json.dumps(result)
    assert result["finished"] and result["error"] is None, json.dumps(result)
    assert result["summary_images"] == result["expected_rows"]
    report = verify_output(Output(str(cluster_run["out"])))
    assert report["strict_clean"], json.dumps(report, indent=2)
    assert report["committed_rows"] == result["expected_rows"], json.dumps(report, indent=2)


def test_cluster_yaml_passes_rays_own_validation() -> None:
    """cluster.yaml parses and passes the checks `ray up` makes before it talks to AWS."""
    import yaml
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = prepare_config(yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text()))
    validate_config(config)
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    gpu_types = [t for t in node_types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert head["resources"].get("GPU", 0) == 0, "generators must never fit on the head"
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)
