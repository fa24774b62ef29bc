"""Cluster-shaped runs: a job submitted through Ray's Jobs API, and generator placement on a multi-node cluster.

Each test runs its own Ray in separate processes with a private RAY_TMPDIR, so it never joins (or stops) the
session's Ray instance or any other Ray on the machine. Selected with `pytest -m slow`.
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

from tests.helpers_ray import run_cluster_script, stop_private_ray

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 180
# Kept out of the working_dir upload: the virtualenv alone is gigabytes, outputs and caches are not code.
UPLOAD_EXCLUDES = [".venv", ".git", "out", "outputs", "*.png", "__pycache__", ".pytest_cache", ".ruff_cache"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One model cache for both tests (the session's if the ray_session fixture set one), built here once."""
    from orchestrator.embedded import resolve_model

    cache = os.environ.get("SEEDSIFT_CACHE") or str(tmp_path_factory.mktemp("seedsift-cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEEDSIFT_CACHE", cache)
        resolve_model("embedded:tiny-sd")
    return cache


@pytest.fixture
def ray_env(model_cache: str) -> Iterator[dict]:
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
    yield env
    stop_private_ray(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def start_head(env: dict, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` in its own session; returns the process and the dashboard (Jobs API) address."""
    dashboard_port = free_port()
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
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


def test_generate_job_through_jobs_api(ray_env: dict, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus

    started = time.time()
    out = tmp_path / "out"
    log_path = tmp_path / "head.log"
    head, address = start_head(ray_env, log_path)
    try:
        client = wait_for_jobs_api(address, head, log_path)
        job_id = client.submit_job(
            entrypoint=(f"python -m jobs.generate --prompts examples/parti-sample.tsv --out {out} "
                        "--limit 4 --candidates 3 --keep 1 --steps 2"),
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
        assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs[-4000:]}"
    finally:
        stop_private_ray(ray_env["RAY_TMPDIR"], roots=[head.pid])
    print(f"jobs API test: {time.time() - started:.1f} s")

    manifest = pq.read_table(out / "manifest" / "shards").to_pylist()
    ok = [row for row in manifest if row["status"] == "ok"]
    assert len(ok) == 4, manifest
    assert len({row["prompt_id"] for row in ok}) == 4
    for row in ok:
        assert (out / row["image_key"]).is_file(), row["image_key"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 4 and summary["failures"] == 0
    # `ray job logs` shows what a terminal shows, in lines: a status line in images and the short summary.
    assert re.search(r"seedsift: images 4/4, [\d.]+/s.*; 0 failed, 0 quarantined", logs), logs[-3000:]
    assert "done: 4 images for 4 prompts in the output" in logs, logs[-3000:]
    assert "Running Dataset" not in logs, logs[-3000:]


def test_generators_land_on_gpu_nodes(ray_env: dict, tmp_path: Path) -> None:
    started = time.time()
    out = tmp_path / "out"
    result = run_cluster_script("cluster_placement.py", out, ray_env, JOB_TIMEOUT_S)
    print(f"placement test: {time.time() - started:.1f} s")

    assert result["cluster_gpus"] == 2
    generators = result["generators"]
    assert len(generators) == 2, generators
    assert {g["node_id"] for g in generators} == set(result["gpu_node_ids"]), "one generator per GPU worker node"
    assert all(g["gpus"] == 1 for g in generators), generators
    assert result["head_node_id"] not in {g["node_id"] for g in generators}
    assert result["manifest_ok_rows"] == 8 and result["manifest_rows"] == 8
    assert result["images_exist"] and result["summary_images"] == 8


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
