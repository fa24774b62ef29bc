"""Soak of the exactly-once promise: many injected faults of seven kinds, each followed by a rerun and a full check.

    .venv/bin/python scripts/soak.py [--faults 52] [--kinds driver,moment,rerun,actor,node,s3,disk] [--minutes 75]
                                     [--seed 0] [--work DIR] [--json FILE]

Every run is the CLI (`python -m jobs.cli generate`) in its own process group with a private RAY_TMPDIR, as a user
or a scheduler runs it; nothing else on the machine is touched. One uninterrupted reference run comes first: its
rows are what every faulted output must end with, its duration the range of the driver kill moments. Then, for
each fault, a fresh output:

- driver: the run is SIGKILLed (its whole process group and its Ray) at a moment drawn uniformly from 0 to the
  reference run's duration: before Ray starts, while the scorer or the duplicate filter starts, while shards
  complete and compact, during the summary;
- moment: the same SIGKILL, the instant the run reaches a named moment: the duplicate filter starting, the scorer
  starting, the first shard compacted, the last shard compacted (the summary being written);
- rerun: the run is SIGKILLed (its whole process group) once its first rows are committed, and the same command
  is rerun at once, while the killed driver is still an unreaped zombie holding the output's lease (a container
  init that never reaps keeps it so for ever): the rerun must take the lease over and finish, not be refused;
- actor: one actor's worker process is SIGKILLed (scorer, generator, duplicate filter, duplicate index, in
  turn), at a random moment after it appears;
- node: a worker node hosting a generator is removed from a ray.cluster_utils.Cluster (tests/cluster_failover.py);
- s3: the output is on a moto S3 server reached through a pausable TCP proxy on 127.0.0.1 (tests/helpers_proxy.py),
  which is paused for a few seconds (short: the retries ride it out) or until the run gives up (long: a run with
  few retries must exit 3 in one line);
- disk: the output is on a tmpfs of random size, smaller than the output, which fills mid-run (exit 3 in one
  line); it is then remounted larger (needs root; skipped otherwise).

After each fault the same command is rerun until it exits 0 (at most twice), and the output is checked: its
delivered rows equal the reference's (same (prompt_id, seed) set), 0 duplicates, 0 rows without image, 0 orphan
images, 0 temporaries, 0 leftover parts (`jobs.verify`, strict). A failed first run must end its console output in
one line naming the output, with no traceback. Prints a Markdown report (faults per kind, kill-moment histogram of
rows committed when the fault hit); `--json` also writes every trial's record.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

KINDS = ("driver", "moment", "rerun", "actor", "node", "s3", "disk")
SHARE = {"driver": 0.27, "moment": 0.08, "rerun": 0.05, "actor": 0.25, "node": 0.10, "s3": 0.15,
         "disk": 0.10}  # of --faults
MOMENTS = ("duplicate filter starting", "scoring actor starting", "first shard compacted", "last shard compacted")
SHARD_SIZE = 4
# The run's actors: one machine without a GPU, so one actor scores and renders (actors/stages/local.py), and its pixel
# rater works inside it (a model rater would add RaterStage). Generators apart from scorers: the node kind.
ACTORS = ("ScoreAndRenderStage", "DuplicateFilter", "DuplicateIndex")
PROMPTS, KEEP = 16, 2
RUN_TIMEOUT_S = 240
FEW_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 1,
                                 "read_timeout": 5}}
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "soak-key-id", "AWS_SECRET_ACCESS_KEY": "soak-secret-value",
                    "AWS_DEFAULT_REGION": "us-east-1"}


def fault_plan(faults: int, kinds: list[str], rng: random.Random) -> list[str]:
    """`faults` kinds in random order: at least one of each asked kind, the rest shared as SHARE says."""
    counts = {kind: 1 for kind in kinds}
    weights = [SHARE[kind] for kind in kinds]
    while sum(counts.values()) < faults:
        counts[rng.choices(kinds, weights)[0]] += 1
    plan = [kind for kind, n in counts.items() for _ in range(n)]
    rng.shuffle(plan)
    return plan


class Runner:
    """Starts the same generate command into a given output, each time with a private Ray, and cleans up after."""

    def __init__(self, work: Path, corpus: Path, cache: str):
        self.work, self.corpus, self.cache = work, corpus, cache
        self.log = open(work / "runs.log", "ab")

    def command(self, out: str, storage_options: dict | None = None, extra: tuple[str, ...] = ()) -> list[str]:
        command = [sys.executable, "-m", "jobs.cli", "generate", "--prompts", str(self.corpus), "--out", out,
                   "--candidates", "4", "--keep", str(KEEP), "--steps", "2", "--guidance", "3.0",
                   "--batch-size", "4", "--generator-cpus", "1", "--shard-size", str(SHARD_SIZE), "--json"]
        if storage_options:
            command += ["--storage-options", json.dumps(storage_options)]
        return command + list(extra)

    def env(self) -> dict:
        from tests.helpers_ray import private_ray_env

        return private_ray_env(SEEDSIFT_CACHE=self.cache, **FAKE_CREDENTIALS)

    def start(self, out: str, storage_options: dict | None = None, extra: tuple[str, ...] = ()) -> Run:
        env = self.env()
        stderr = tempfile.TemporaryFile(dir=self.work)
        self.log.write(f"\n=== {time.strftime('%H:%M:%S')} start {out}\n".encode())
        self.log.flush()
        process = subprocess.Popen(self.command(out, storage_options, extra), cwd=REPO_ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        return Run(process, env["RAY_TMPDIR"], stderr, self.log)

    def complete(self, out: str, storage_options: dict | None = None, attempts: int = 2,
                 extra: tuple[str, ...] = ()) -> list[int]:
        """The same command until it exits 0 (at most `attempts` times); the exit statuses."""
        statuses = []
        for _ in range(attempts):
            run = self.start(out, storage_options, extra)
            statuses.append(run.wait(RUN_TIMEOUT_S))
            if statuses[-1] == 0:
                break
        return statuses


class Run:
    def __init__(self, process: subprocess.Popen, ray_tmp: str, stderr, log):
        self.process, self.ray_tmp, self._stderr, self._log = process, ray_tmp, stderr, log
        self.started = time.time()
        self.stderr = ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.stop()

    def until(self, seconds: float) -> bool:
        """Wait until `seconds` after the start or the run's end, whichever comes first; True if still running."""
        while self.alive() and time.time() - self.started < seconds:
            time.sleep(0.05)
        return self.alive()

    def kill(self) -> int:
        """SIGKILL the process group (driver and its local Ray), as a lost machine or OOM killer would."""
        return self.stop()

    def stop(self) -> int:
        """SIGKILL what is left of the run (all of it if still running: status -9) and collect its output."""
        from tests.helpers_ray import kill_run

        ended = self.process.poll()
        kill_run(self.process, self.ray_tmp)  # the process group, then whatever its Ray left behind
        status = -9 if ended is None else ended
        if self.process.stdout:
            self.process.stdout.close()
        self._stderr.seek(0)
        self.stderr = self._stderr.read().decode(errors="replace")
        self._stderr.close()
        self._log.write(self.stderr.encode() + f"--- exit {status}\n".encode())
        self._log.flush()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return status

    def actor_pids(self, name: str) -> list[int]:
        """Worker processes of this run's Ray whose title names the actor class (Ray sets `ray::Class...`)."""
        import psutil

        pids = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                title = " ".join(proc.info["cmdline"] or [])
                if title.startswith("ray::") and name in title and proc.environ().get("RAY_TMPDIR") == self.ray_tmp:
                    pids.append(proc.pid)
            except psutil.Error:
                continue
        return pids


def one_line_failure(stderr: str, out: str) -> bool:
    """A failed run's console: its last line names the output and says to rerun, and no traceback shows."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return bool(lines) and out in lines[-1] and "rerun the same command" in lines[-1] and "Traceback" not in stderr


def committed_rows(out: str, storage_options: dict | None) -> int:
    from jobs.verify import verify_output

    return verify_output(out, storage_options)["committed_rows"]


CHECKED = ("delivered_rows", "duplicates", "missing_images", "orphan_images", "temporary_files", "leftover_parts",
           "damaged_objects", "strict_clean")  # what a trial keeps of the verify report


def final_check(out: str, storage_options: dict | None, reference: set) -> dict:
    from jobs.verify import verify_output
    from orchestrator.output.storage import Output
    from tests.helpers_manifest import manifest_frame

    report = verify_output(out, storage_options)
    rows = manifest_frame(Output(out, storage_options))
    delivered = set(zip(rows.prompt_id, rows.seed.astype(int)))
    return {key: report[key] for key in CHECKED} | {
        "same_rows_as_reference": delivered == reference and len(rows) == len(reference)}


class Soak:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.rng = random.Random(args.seed)
        from actors.models.embedded import cache_root, resolve_model

        resolve_model("embedded:tiny-sd")  # built once here, never half-built by a killed run
        self.cache = str(cache_root())
        corpus = work / "prompts.txt"
        corpus.write_text("\n".join(f"soak prompt {i}: a {c} object" for i, c in
                                    zip(range(PROMPTS), ["red", "green", "blue"] * PROMPTS)) + "\n")
        self.runner = Runner(work, corpus, self.cache)
        self.count = 0
        self._s3 = None

    def out(self, kind: str) -> str:
        self.count += 1
        return str(self.work / f"{self.count:03d}-{kind}")

    # --- the reference -------------------------------------------------------------------------------------------
    def reference(self) -> dict:
        from orchestrator.output.storage import Output
        from tests.helpers_manifest import manifest_frame

        out = self.out("reference")
        for _ in range(2):  # not a fault trial: a machine too busy for Ray's start-up gets one more go
            run = self.runner.start(out)
            status = run.wait(RUN_TIMEOUT_S)
            if status == 0:
                break
        if status != 0:
            raise SystemExit(f"the reference run failed twice (exit {status}):\n{run.stderr[-3000:]}")
        rows = manifest_frame(Output(out))
        self.rows = set(zip(rows.prompt_id, rows.seed.astype(int)))
        self.duration = time.time() - run.started
        self.bytes = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
        return {"rows": len(self.rows), "seconds": round(self.duration, 1), "bytes": self.bytes}

    # --- one fault of each kind ------------------------------------------------------------------------------------
    def driver(self) -> dict:
        out = self.out("driver")
        at = self.rng.uniform(0, self.duration)
        run = self.runner.start(out)
        if not run.until(at):
            return {"skipped": f"finished at {time.time() - run.started:.1f} s, before the kill at {at:.1f} s",
                    "first_status": run.stop()}
        status = run.kill()
        return {"detail": f"SIGKILL at {at:.1f} s", "at_fraction": round(at / self.duration, 3),
                "first_status": status, "committed_at_fault": committed_rows(out, None),
                "reruns": self.runner.complete(out), "out": out}

    def moment(self, index: int) -> dict:
        """A driver SIGKILL the instant the run reaches a named moment (polled every 10 ms): the duplicate filter's
        or the scoring actor's process appears; the first shard's compacted object appears (its open parts may still
        be there); the last one appears (every row committed: the report and summary are being written)."""
        name = MOMENTS[index % len(MOMENTS)]
        out = self.out("moment")
        shards = Path(out) / "manifest" / "shards"

        def reached() -> bool:
            if name.startswith("duplicate"):
                return bool(run.actor_pids("DuplicateFilter") or run.actor_pids("DuplicateIndex"))
            if name.startswith("scoring"):
                return bool(run.actor_pids("ScoreAndRenderStage"))
            compacted = len(list(shards.rglob("*.parquet"))) if shards.exists() else 0
            return compacted >= (1 if name.startswith("first") else -(-PROMPTS // SHARD_SIZE))

        run = self.runner.start(out)
        while run.alive() and not reached():
            time.sleep(0.01)
        if not run.alive():
            return {"skipped": f"finished before '{name}' was seen", "first_status": run.stop()}
        at = time.time() - run.started
        status = run.kill()
        return {"detail": f"SIGKILL at '{name}' ({at:.1f} s)", "first_status": status,
                "committed_at_fault": committed_rows(out, None), "reruns": self.runner.complete(out), "out": out}

    def rerun(self) -> dict:
        """SIGKILL the run's process group once rows are committed, without reaping the driver, and rerun the same
        command at once: the zombie's lease must not hold the output (0.2 refused the rerun with exit 4)."""
        import psutil

        out = self.out("rerun")
        run = self.runner.start(out)
        while run.alive() and committed_rows(out, None) == 0:
            time.sleep(0.05)
        if not run.alive():
            return {"skipped": "finished before its first rows were committed", "first_status": run.stop()}
        at = time.time() - run.started
        committed = committed_rows(out, None)
        os.killpg(run.process.pid, signal.SIGKILL)  # not waited for: the driver stays a zombie, its lease on disk
        deadline = time.time() + 10
        while psutil.Process(run.process.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
            time.sleep(0.01)
        reruns = self.runner.complete(out, attempts=1)  # at once, and once: a refusal (exit 4) is the failure
        status = run.stop()  # now reap the zombie and sweep what its Ray left
        return {"detail": f"SIGKILL at {at:.1f} s, rerun at once beside the zombie driver", "first_status": status,
                "committed_at_fault": committed, "reruns": reruns, "out": out}

    def actor(self, index: int) -> dict:
        name = ACTORS[index % len(ACTORS)]
        out = self.out("actor")
        # A small output's one index bucket lives in the filter; two buckets give the index actors to kill.
        extra = ("--dedup-buckets", "2") if name == "DuplicateIndex" else ()
        run = self.runner.start(out, extra=extra)
        while run.alive() and not run.actor_pids(name) and time.time() - run.started < RUN_TIMEOUT_S:
            time.sleep(0.1)
        # Somewhere in its life: the stages' pools live to the run's end, the duplicate filter and index only while
        # the corpus is read (a few seconds here).
        seen = time.time() - run.started
        at = seen + self.rng.uniform(0, 2) if name.startswith("Duplicate") else self.rng.uniform(seen, self.duration)
        run.until(at)
        victims = run.actor_pids(name)
        if not victims:
            status = run.wait(RUN_TIMEOUT_S)
            return {"skipped": f"no {name} actor alive at {at:.0f} s", "first_status": status}
        committed = committed_rows(out, None)
        os.kill(self.rng.choice(victims), signal.SIGKILL)
        status = run.wait(RUN_TIMEOUT_S)
        result = {"detail": f"SIGKILL {name} at {at:.0f} s", "first_status": status, "committed_at_fault": committed, "out": out,
                  "reruns": [] if status == 0 else self.runner.complete(out, extra=extra)}
        if status not in (0, -9):
            result["one_line"] = one_line_failure(run.stderr, out)
        return result

    def node(self) -> dict:
        from tests.helpers_ray import stop_private_ray

        folder = Path(self.out("node"))  # the failover script writes its corpus next to its output
        folder.mkdir()
        out = str(folder / "out")
        env = self.runner.env() | {"RAY_AUTH_MODE": "disabled"}
        script = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "cluster_failover.py"), out], env=env,
                                  cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            output, _ = script.communicate(timeout=2 * RUN_TIMEOUT_S)  # three Ray nodes start on one machine
        except subprocess.TimeoutExpired:
            output = b"(no output: the failover script did not finish in time)"
        finally:
            stop_private_ray(env["RAY_TMPDIR"], roots=[script.pid])
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
        self.runner.log.write(output)
        lines = [line for line in output.decode(errors="replace").splitlines() if line.startswith("RESULT:")]
        if not lines:  # the cluster itself could not run: a failed trial, with the script's last words kept
            tail = output.decode(errors="replace").strip().splitlines()[-1:] or [""]
            return {"detail": "node removal", "first_status": script.returncode, "out": out, "checked": True,
                    "error": f"the failover script printed no RESULT line: {tail[0][:300]}"}
        result = json.loads(lines[-1][len("RESULT:"):])
        return {"detail": "worker node removed" + ("" if result["removed_node_had_generator"] else
                                                   " (it held no generator)"),
                "first_status": 0 if result["finished"] and not result["error"] else 1,
                "committed_at_fault": result["parts_before_removal"], "committed_unit": "parts",
                "error": result["error"], "out": out, "reference": "failover",
                "expected_rows": result["expected_rows"]}

    def s3(self, index: int) -> dict:
        import s3fs

        proxy, _ = self.s3_endpoint()
        bucket = f"soak-{self.count + 1:03d}"
        s3fs.S3FileSystem(endpoint_url=self.moto_url, key=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          secret=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).mkdir(bucket)
        self.out("s3")
        out = f"s3://{bucket}/out"
        long = index % 2 == 1
        options = {"endpoint_url": proxy.url, **(FEW_RETRIES if long else {})}
        at = self.rng.uniform(0.15, 0.9) * self.duration
        run = self.runner.start(out, options)
        if not run.until(at):
            return {"skipped": "finished before the outage", "first_status": run.stop()}
        committed = committed_rows(out, {"endpoint_url": self.moto_url})
        proxy.pause()
        if long:
            status = run.wait(RUN_TIMEOUT_S)
            outage = time.time() - run.started - at
            proxy.resume()
        else:
            outage = self.rng.uniform(2, 8)
            time.sleep(outage)
            proxy.resume()
            status = run.wait(RUN_TIMEOUT_S)
        result = {"detail": f"{'long' if long else 'short'} outage of {outage:.0f} s at {at:.0f} s",
                  "first_status": status, "committed_at_fault": committed, "out": out,
                  "storage_options": options, "reruns": [] if status == 0 else self.runner.complete(out, options)}
        if status != 0:
            result["one_line"] = one_line_failure(run.stderr, out)
        return result

    def s3_endpoint(self):
        if self._s3 is None:
            from moto.server import ThreadedMotoServer

            from tests.conftest import free_port
            from tests.helpers_proxy import PausableProxy

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
            os.environ.update(FAKE_CREDENTIALS)
            port = free_port()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
            server.start()
            self.moto_url = f"http://127.0.0.1:{port}"
            self._s3 = (server, PausableProxy(port))
        return self._s3[1], self.moto_url

    def disk(self) -> dict:
        mount = self.work / f"disk-{self.count + 1:03d}"
        mount.mkdir()
        size = int(self.rng.uniform(0.2, 0.7) * self.bytes)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, check=False).returncode:
            return {"skipped": "mounting a tmpfs needs root"}
        try:
            out = str(mount / self.out("disk").rsplit("/", 1)[1])
            run = self.runner.start(out)
            status = run.wait(RUN_TIMEOUT_S)
            committed = committed_rows(out, None)
            result = {"detail": f"tmpfs of {size // 1024} KB (output {self.bytes // 1024} KB)",
                      "first_status": status, "committed_at_fault": committed, "out": out}
            if status != 0:
                result["one_line"] = one_line_failure(run.stderr, out)
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
            result["reruns"] = [] if status == 0 else self.runner.complete(out)
            result.update(final_check(out, None, self.rows))
            result["checked"] = True
            return result
        finally:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)

    # --- the loop ----------------------------------------------------------------------------------------------------
    def trial(self, kind: str, index: int) -> dict:
        started = time.time()
        if kind == "driver":
            result = self.driver()
        elif kind == "moment":
            result = self.moment(index)
        elif kind == "rerun":
            result = self.rerun()
        elif kind == "actor":
            result = self.actor(index)
        elif kind == "node":
            result = self.node()
        elif kind == "s3":
            result = self.s3(index)
        else:
            result = self.disk()
        result["kind"] = kind
        if "skipped" not in result and not result.pop("checked", False):
            if result.get("reference") == "failover":  # its own corpus: the rows it expects, checked by verify
                from jobs.verify import verify_output

                report = verify_output(result["out"])
                result.update({key: report[key] for key in CHECKED})
                result["same_rows_as_reference"] = report["delivered_rows"] == result["expected_rows"]
            else:
                result.update(final_check(result["out"], self.check_options(result), self.rows))
        result["seconds"] = round(time.time() - started, 1)
        result["ok"] = "skipped" in result or (
            result.get("strict_clean") and result.get("same_rows_as_reference")
            and (not result.get("reruns") or result["reruns"][-1] == 0) and result.get("one_line", True)
            and not result.get("error"))
        return result

    def check_options(self, result: dict) -> dict | None:
        if "storage_options" in result:
            return {"endpoint_url": self.moto_url}  # checked straight on the store, not through the proxy
        return None

    def close(self):
        if self._s3:
            self._s3[1].close()
            self._s3[0].stop()


def histogram(values: list[int], top: int, bins: int = 8) -> list[tuple[str, int]]:
    width = max(1, -(-top // bins))
    counts = Counter(min(v // width, bins - 1) for v in values)
    return [(f"{i * width}-{min(top, (i + 1) * width - 1) if i < bins - 1 else top}", counts.get(i, 0))
            for i in range(bins)]


def report(trials: list[dict], reference: dict, wall: float) -> str:
    done = [t for t in trials if "skipped" not in t]
    lines = ["| kind | faults | first run exit statuses | clean after rerun | one-line failures |",
             "|---|---|---|---|---|"]
    for kind in KINDS:
        of_kind = [t for t in done if t["kind"] == kind]
        if not of_kind:
            continue
        statuses = Counter(t["first_status"] for t in of_kind)
        failed = [t for t in of_kind if "one_line" in t]
        lines.append(f"| {kind} | {len(of_kind)} | " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))
                     + f" | {sum(bool(t['ok']) for t in of_kind)} | "
                     + (f"{sum(t['one_line'] for t in failed)} of {len(failed)}" if failed else "none failed") + " |")
    details = Counter(t["detail"].split(" at ")[0].split(" of ")[0] if t["kind"] != "moment" else t["detail"].split(" (")[0]
                      for t in done if t["kind"] in ("moment", "actor", "s3"))
    totals = {key: sum(t.get(key, 0) for t in done) for key in ("duplicates", "missing_images", "orphan_images",
                                                                "temporary_files", "leftover_parts")}
    expected = sum(t.get("expected_rows", reference["rows"]) for t in done)
    delivered = sum(t.get("delivered_rows", 0) for t in done)
    lines += ["", f"faults injected: {len(done)} ({len(trials) - len(done)} draws skipped: the run ended before "
              "the fault); " + ", ".join(f"{d}: {n}" for d, n in sorted(details.items())),
              f"rows expected {expected}, delivered {delivered}; duplicates {totals['duplicates']}, rows without "
              f"image {totals['missing_images']}, orphan images {totals['orphan_images']}, temporaries "
              f"{totals['temporary_files']}, leftover parts {totals['leftover_parts']}; outputs equal to the "
              f"reference: {sum(bool(t.get('same_rows_as_reference')) for t in done)} of {len(done)}",
              f"reference run: {reference['rows']} rows in {reference['seconds']} s; soak wall time {wall:.0f} s", "",
              "Rows committed when the fault hit (all kinds but node):", "",
              "| rows committed | faults | |", "|---|---|---|"]
    moments = [t["committed_at_fault"] for t in done if "committed_at_fault" in t and
               t.get("committed_unit") != "parts"]
    for label, n in histogram(moments, reference["rows"]):
        lines.append(f"| {label} | {n} | {'#' * n} |")
    driver = [t["at_fraction"] for t in done if t["kind"] == "driver"]
    if driver:
        lines += ["", "Driver kill moments, as a fraction of the reference run's duration:", "",
                  "| fraction | kills |", "|---|---|"]
        counts = Counter(min(int(f * 5), 4) for f in driver)
        lines += [f"| {i / 5:.1f}-{(i + 1) / 5:.1f} | {counts.get(i, 0)} |" for i in range(5)]
    bad = [t for t in trials if not t["ok"]]
    lines += ["", f"**soak {'PASSED' if not bad else 'FAILED'}**" + (
        "" if not bad else ": " + "; ".join(f"{t['kind']} ({t.get('detail')}) in {t.get('out')}" for t in bad))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=52, help="faults to inject (draws that miss are redone)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--minutes", type=float, default=75.0, help="stop drawing new faults after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for outputs and runs.log (default: a new temp folder)")
    parser.add_argument("--json", default=None, help="write every trial's record here")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the outputs of clean trials")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {','.join(KINDS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="seedsift-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    soak = Soak(args, work)
    trials: list[dict] = []
    try:
        reference = soak.reference()
        print(f"reference: {reference}", flush=True)
        plan = fault_plan(args.faults, kinds, soak.rng)
        index = Counter()
        while plan and time.time() - started < args.minutes * 60:
            kind = plan[0]
            result = soak.trial(kind, index[kind])
            trials.append(result)
            if "skipped" in result and result["skipped"].startswith("mounting"):
                plan = [k for k in plan if k != "disk"]
                continue
            if "skipped" not in result:
                plan.pop(0)
                index[kind] += 1
            print(f"{len(trials):3d} {kind:6s} {result.get('detail', result.get('skipped'))}: "
                  f"{'ok' if result['ok'] else 'NOT CLEAN'} in {result['seconds']} s", flush=True)
            if result["ok"] and "out" in result and not args.keep_outputs and not result["out"].startswith("s3:"):
                shutil.rmtree(Path(result["out"]).parent if kind == "node" else result["out"], ignore_errors=True)
    finally:
        soak.close()
    text = report(trials, reference, time.time() - started)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"reference": reference, "trials": trials}, indent=1) + "\n")
    return 0 if all(t["ok"] for t in trials) and not plan else 1


if __name__ == "__main__":
    sys.exit(main())
