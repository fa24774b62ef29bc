"""Shared helpers for the benchmark scripts: machine facts, load and memory sampling, tables and JSON results.

Used by every benchmarks/bench_*.py script; nothing here is imported by the pipeline.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The interpreter every benchmark child runs with: SEEDSIFT_PYTHON where given (a GPU machine's own python with a
# CUDA torch and the project's other packages on PYTHONPATH, where setup.sh cannot reach a registry), else the
# project's environment that scripts/setup.sh made, else the interpreter running this.
PYTHON = os.environ.get("SEEDSIFT_PYTHON") or str(REPO_ROOT / ".venv" / "bin" / "python")
if not os.path.exists(PYTHON) and os.sep not in PYTHON:
    PYTHON = shutil.which(PYTHON) or PYTHON
if not os.path.exists(PYTHON):
    PYTHON = sys.executable
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@functools.lru_cache(maxsize=1)
def gpu_name() -> str | None:
    """The first GPU's name and memory as nvidia-smi gives them, or None where there is no NVIDIA GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def machine() -> dict:
    """Cores, memory, load averages (1/5/15 min) at the moment of the call."""
    with open("/proc/meminfo") as handle:
        total_kb = int(handle.readline().split()[1])
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(total_kb / 2**20, 1),
        "gpu": gpu_name() or False,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "packages": package_versions(),
    }


def package_versions() -> dict:
    """The versions of the libraries a figure depends on, as installed for this interpreter (None: not installed)."""
    from importlib import metadata

    versions = {}
    for name in ("torch", "diffusers", "transformers", "ray"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class LoadSampler:
    """Samples the 1-minute load average every second in a thread: what other users did during a measurement."""

    def __init__(self, period: float = 1.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(period)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        return {"load1_min": round(min(self.samples), 2), "load1_mean": round(sum(self.samples) / len(self.samples), 2),
                "load1_max": round(max(self.samples), 2)}


def vm_rss_mb(pid: int | str = "self") -> float:
    """Current resident set size of a process from /proc/PID/status (VmRSS), in MB."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """Peak VmRSS of one process, sampled in a thread (every 0.2 s by default)."""

    def __init__(self, pid: int | str = "self", period: float = 0.2):
        self.pid, self.peak_mb, self.samples = pid, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            try:
                self.peak_mb = max(self.peak_mb, vm_rss_mb(self.pid))
                self.samples += 1
            except OSError:
                return
            self._stop.wait(period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def max_rss_mb() -> float:
    """Peak RSS of this process over its whole life (getrusage; kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args: list[str], env: dict | None = None, timeout: float = 3600) -> tuple[dict, float]:
    """Run a benchmark child process that prints one `RESULT:{json}` line; returns (result, wall seconds)."""
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT:")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT:"):]), wall


def emit(result: dict) -> None:
    """A child's answer to run_child."""
    print("RESULT:" + json.dumps(result), flush=True)


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` restricted to `columns` (floats rounded to 3 significant figures)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
        if isinstance(value, int) and abs(value) >= 1e4:
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, payload: dict, text: str, results_dir: Path | None = None) -> Path:
    """Print the table and write benchmarks/results/NAME.json (payload + the table + machine facts at the end)."""
    results_dir = results_dir or RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine_at_end": machine(), **payload, "table": text}
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    (results_dir / f"{name}.md").write_text(text + "\n")
    print(text)
    print(f"\nwritten: {path}")
    return path


class ImageWatcher:
    """Polls a folder for image files and records when each first appears (perf_counter): both sides of the
    comparison are timed the same way, from outside, where a user would look for the images."""

    def __init__(self, folder: str, suffix: str = ".png", period: float = 0.02):
        from orchestrator.output.storage import TEMPORARY_MARK  # the parent's only: the plain child does not pay for it

        self.temporary_mark = TEMPORARY_MARK
        self.folder, self.suffix, self.period = folder, suffix, period
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _scan(self) -> None:
        now = time.perf_counter()
        for root, _, names in os.walk(self.folder):
            for name in names:
                # seedsift writes under a temporary name and renames: only final names count.
                if name.endswith(self.suffix) and self.temporary_mark not in name:
                    self.seen.setdefault(os.path.join(root, name), now)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._scan()
            self._stop.wait(self.period)

    def __enter__(self) -> ImageWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._scan()

    def curve(self, since: float) -> list[tuple[float, int]]:
        """(seconds since `since`, images written by then), one point per image."""
        return [(t - since, n + 1) for n, t in enumerate(sorted(self.seen.values()))]


def run_watched(args: list[str], out: str, env: dict | None = None) -> tuple[str, float, float, list]:
    """Run one side as its own process; returns (stdout, wall clock at start, wall seconds, image curve)."""
    os.makedirs(out, exist_ok=True)
    started_wall, started = time.time(), time.perf_counter()
    with ImageWatcher(out) as watcher:
        proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout, started_wall, wall, watcher.curve(started)
