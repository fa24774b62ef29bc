"""Start-up trace: when each process of a run started, finished its imports, loaded its model, did its first work.

Off unless SEEDSIFT_TRACE names a file; then the driver and every stage append one JSON line per event to it
(local Ray passes the driver's environment to its workers). `benchmarks/bench_overhead.py` reads it to say where
a job's fixed cost goes. Nothing here imports more than the standard library, so tracing costs nothing it measures.
"""

from __future__ import annotations

import json
import os
import time

ENV = "SEEDSIFT_TRACE"


def process_started() -> float:
    """When this process started (wall clock, from /proc): start-up is measured from there, as a user waits."""
    try:
        with open("/proc/self/stat") as handle:
            ticks_after_boot = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + ticks_after_boot / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return time.time()


def mark(who: str, event: str, at: float | None = None) -> None:
    """Append {who, event, t, pid} to the trace file, if tracing is on."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"who": who, "event": event, "t": time.time() if at is None else at, "pid": os.getpid()})
    with open(path, "a") as handle:  # one short append per event: lines from several processes do not interleave
        handle.write(line + "\n")


class FirstCall:
    """Marks the first call of a stage (start and end), then nothing."""

    def __init__(self, who: str):
        self.who, self.pending = who, bool(os.environ.get(ENV))

    def __enter__(self) -> None:
        if self.pending:
            mark(self.who, "first call")

    def __exit__(self, *exc) -> None:
        if self.pending:
            self.pending = False
            mark(self.who, "first call done")
