"""Bounded soak of the exactly-once promise: cycles of a run SIGKILLed at a random moment, then resumed and verified.

    .venv/bin/python scripts/soak.py [--minutes 10] [--prompts 24] [--out DIR] [--seed 0]

Each run is `python -m jobs.generate` in its own process group with a private RAY_TMPDIR (its own local Ray), so a
kill takes the driver and its Ray down together and nothing else on the machine is touched. Each cycle writes a
fresh output, so every kill lands on unfinished work; the same command then resumes it to completion and
jobs.verify checks it (no duplicate, no row without image, no image without row). A table of totals is printed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

FINAL_RESERVE_S = 150  # time kept for a cycle's resuming run
KEEP = 2


def stop_run(process: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL the run's process group and its private Ray (never `ray stop`), then drop its temp folder."""
    from tests.helpers_ray import kill_run

    kill_run(process, ray_tmp)
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
    log = open(work / "runs.log", "ab")
    started = time.time()
    totals = {"cycles": 0, "kills": 0, "kills_after_a_commit": 0, "rows_committed_before_kill": 0,
              "rows_expected": 0, "rows_delivered": 0, "duplicates": 0, "missing_images": 0, "orphan_images": 0,
              "temporary_files": 0, "failed_cycles": 0}
    # Each cycle: a fresh output, a run SIGKILLed at a random moment, then the same command to completion, then
    # verify. A fresh output per cycle means every kill lands on unfinished work.
    while time.time() - started < budget - FINAL_RESERVE_S:
        totals["cycles"] += 1
        out = str(work / f"out-{totals['cycles']}")
        process, ray_tmp = start_run(str(corpus), out, log)
        deadline = time.time() + rng.uniform(8, 40)
        while process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        killed = process.poll() is None
        stop_run(process, ray_tmp)
        if killed:
            totals["kills"] += 1
            if os.path.exists(os.path.join(out, "manifest")):
                mid = verify_output(out)
                totals["rows_committed_before_kill"] += mid["committed_rows"]
                totals["kills_after_a_commit"] += mid["committed_rows"] > 0
                totals["duplicates"] += mid["duplicates"]
                totals["missing_images"] += mid["missing_images"]
            process, ray_tmp = start_run(str(corpus), out, log)
            try:
                process.wait(timeout=FINAL_RESERVE_S)
            finally:
                stop_run(process, ray_tmp)
        report = verify_output(out)
        expected = args.prompts * KEEP
        totals["rows_expected"] += expected
        totals["rows_delivered"] += report["committed_rows"]
        for key in ("duplicates", "missing_images", "orphan_images", "temporary_files"):
            totals[key] += report[key]
        cycle_ok = process.returncode == 0 and report["strict_clean"] and report["committed_rows"] == expected
        totals["failed_cycles"] += not cycle_ok
        print(f"cycle {totals['cycles']}: {'killed then resumed' if killed else 'finished before the kill'}, "
              f"{'clean' if cycle_ok else 'NOT CLEAN'} at {time.time() - started:.0f} s", flush=True)

    rows = [(name.replace("_", " "), value) for name, value in totals.items()]
    rows.append(("wall time (s)", round(time.time() - started)))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    ok = totals["failed_cycles"] == 0 and totals["rows_delivered"] == totals["rows_expected"]
    print(f"soak {'PASSED' if ok else 'FAILED'}; outputs under {work}, run logs {work / 'runs.log'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
