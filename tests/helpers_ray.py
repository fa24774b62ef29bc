"""Helpers for tests that run a private Ray (a local head or a ray.cluster_utils.Cluster) in a subprocess.

Such tests never touch the pytest session's own Ray instance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]


def private_ray_env(**extra: str) -> dict:
    """This process's environment for a job with a Ray of its own: no address or token of another Ray, a fresh
    RAY_TMPDIR (which stop_private_ray finds its processes by), unbuffered output, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_TMPDIR=tempfile.mkdtemp(prefix="seedsift-ray-", dir="/tmp"), PYTHONUNBUFFERED="1", **extra)
    return env


def session_ray_env(**extra: str) -> dict:
    """This process's environment for a job process that joins the pytest session's Ray (as `ray job submit` and
    --address runs join a cluster): its address, token authentication as the session uses it, no private
    RAY_TMPDIR, unbuffered output, plus `extra`. Killing such a job kills only its driver; Ray ends its actors."""
    import ray

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_TMPDIR", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1", **extra)
    env.setdefault("RAY_AUTH_MODE", "token")
    return env


def private_ray_processes(ray_tmp: str) -> list[psutil.Process]:
    """Processes started with one private Ray's RAY_TMPDIR (its daemons and workers), this process aside."""
    found, me = [], os.getpid()
    for proc in psutil.process_iter():
        try:
            if proc.pid != me and proc.environ().get("RAY_TMPDIR") == ray_tmp:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def stop_private_ray(ray_tmp: str, roots: list[int] = ()) -> None:
    """Stop only the processes of one private Ray: descendants of `roots` and anything started with its RAY_TMPDIR.

    `ray stop` is not used: it terminates every Ray process of the user on the machine, other tests' included.
    """
    victims: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            victims[root.pid] = root
            victims.update({child.pid: child for child in root.children(recursive=True)})
        except psutil.Error:
            pass
    victims.update({proc.pid: proc for proc in private_ray_processes(ray_tmp)})
    procs = list(victims.values())
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def kill_run(process: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL a job's whole process group (the fault under test), then stop what its private Ray left behind."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    stop_private_ray(ray_tmp, roots=[process.pid])


def run_cluster_script(name: str, out: Path, env: dict, timeout: float) -> dict:
    """Run tests/NAME with the venv's python in its own session; return the JSON it prints after `RESULT:`.

    Whatever happens, the script's private Ray is stopped (by its process tree and its RAY_TMPDIR).
    """
    import pytest  # only the tests call this; scripts/soak.py imports this module without pytest's machinery

    script = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / name), str(out)], env=env, cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = script.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_private_ray(env["RAY_TMPDIR"], roots=[script.pid])
        output, _ = script.communicate()
        pytest.fail(f"{name} did not finish in {timeout} s:\n{output.decode()[-4000:]}")
    finally:
        stop_private_ray(env["RAY_TMPDIR"], roots=[script.pid])
    text = output.decode(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("RESULT:")]
    assert script.returncode == 0 and lines, f"{name} exited {script.returncode}:\n{text[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULT:"))
