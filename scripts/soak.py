"""Bounded soak of the exactly-once promise: start a generate run, SIGKILL it at a random moment, repeat; finish.

    .venv/bin/python scripts/soak.py [--minutes 10] [--prompts 24] [--out DIR] [--seed 0]

Each run is `python -m jobs.generate` in its own process group with a private RAY_TMPDIR (its own local Ray), so a
kill takes the driver and its Ray down together and nothing else on the machine is touched. Some runs are allowed
to finish. At the end one run goes to completion and jobs.verify checks the output; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

FINAL_RESERVE_S = 150  # time kept for the final uninterrupted run
KEEP = 2


def stop_private_ray(process: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL the run's process group, then any process started with its private RAY_TMPDIR (never `ray stop`)."""
    import psutil

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    me = os.getpid()
    leftovers = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != me and proc.environ().get("RAY_TMPDIR") == ray_tmp:
                leftovers.append(proc)
        except psutil.Error:
            pass
    for proc in leftovers:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=10)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def start_run(corpus: str, out: str, log) -> tuple[subprocess.Popen, str]:
    ray_tmp = tempfile.mkdtemp(prefix="soak-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "jobs.generate", "--prompts", corpus, "--out", out, "--candidates", "4",
               "--keep", str(KEEP), "--steps", "2", "--guidance", "3.0", "--batch-size", "4", "--generator-cpus", "1"]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True), ray_tmp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="total budget, final run included (max 10)")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    budget = min(args.minutes, 10.0) * 60
    rng = random.Random(args.seed)

    from jobs.verify import verify_output
    from orchestrator.embedded import resolve_model

    resolve_model("embedded:tiny-sd")  # built once here, never half-built by a killed run
    work = Path(args.out or tempfile.mkdtemp(prefix="seedsift-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "prompts.txt"
    corpus.write_text("\n".join(f"soak prompt {i}: a {c} object" for i, c in
                                zip(range(args.prompts), ["red", "green", "blue"] * args.prompts)) + "\n")
    out = str(work / "out")
    log = open(work / "runs.log", "ab")
    started = time.time()
    runs = kills = finished = 0
    worst_mid = {"duplicates": 0, "missing_images": 0, "orphan_images": 0}
    while time.time() - started < budget - FINAL_RESERVE_S:
        runs += 1
        process, ray_tmp = start_run(str(corpus), out, log)
        let_finish = rng.random() < 0.15
        deadline = time.time() + (FINAL_RESERVE_S if let_finish else rng.uniform(4, 45))
        while process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        if process.poll() is None:
            kills += 1
        elif process.returncode == 0:
            finished += 1
        stop_private_ray(process, ray_tmp)
        if os.path.exists(os.path.join(out, "manifest")):
            mid = verify_output(out)
            for key in worst_mid:
                worst_mid[key] = max(worst_mid[key], mid[key])
        print(f"run {runs}: {'finished' if process.returncode == 0 else 'killed'} at {time.time() - started:.0f} s",
              flush=True)

    runs += 1
    process, ray_tmp = start_run(str(corpus), out, log)
    try:
        process.wait(timeout=max(60, budget - (time.time() - started)) + 120)
    finally:
        stop_private_ray(process, ray_tmp)
    final_ok = process.returncode == 0
    finished += final_ok
    report = verify_output(out)
    expected = args.prompts * KEEP
    # Rows the killed runs had committed: the final run must have skipped them, not rendered them again.
    final_summary = json.loads(Path(out, "summary.json").read_text()) if final_ok else {}
    committed_before_final = final_summary.get("this_run", {}).get("skipped_already_committed")
    rows = [
        ("runs", runs), ("killed (SIGKILL)", kills), ("finished", finished),
        ("rows expected", expected), ("rows delivered", report["committed_rows"]),
        ("rows committed by killed runs (skipped by the final run)", committed_before_final),
        ("duplicates", report["duplicates"]), ("missing images", report["missing_images"]),
        ("orphan images", report["orphan_images"]), ("temporary files", report["temporary_files"]),
        ("worst mid-soak duplicates", worst_mid["duplicates"]),
        ("worst mid-soak missing images", worst_mid["missing_images"]),
        ("worst mid-soak orphans (allowed)", worst_mid["orphan_images"]),
        ("wall time (s)", round(time.time() - started)),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    ok = final_ok and report["strict_clean"] and report["committed_rows"] == expected
    print(f"soak {'PASSED' if ok else 'FAILED'}; output {out}, run logs {work / 'runs.log'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
