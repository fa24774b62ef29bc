"""A pytest plugin: the machine's busy CPU-seconds around each test, for finding where a tier's work goes.

    PYTHONPATH=benchmarks .venv/bin/python -m pytest -p pytest_cpu -m "slow or browser" [--cpu-log FILE]

Run the tier in one process (no `-n`) on a machine with nothing else running: the figure is the whole machine's
busy time (psutil's cpu_times: user, nice, system, irq, softirq) while the test ran, set-up and teardown included,
so it counts the Ray actors, tasks and subprocesses a test starts, which pytest's own `--durations` (wall time)
does not tell apart from waiting. With --cpu-log each test's figures also go to a file as JSON lines; the session
ends with the most expensive tests and the sum per file. Linux (irq and softirq are Linux's fields). (The tier-level
figures of the README come from whole `.ci/run` runs instead.)
"""

from __future__ import annotations

import collections
import json
import time

import psutil
import pytest

def busy_seconds() -> float:
    """The machine's CPU-seconds spent busy since boot: all cores, not idle, waiting for I/O or stolen."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cpu-log", default=None, help="also write each test's figures to this file (JSON lines)")
    parser.addoption("--cpu-top", type=int, default=25, help="how many tests the summary lists")


def pytest_configure(config: pytest.Config) -> None:
    config._cpu_rows = []  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    busy, started = busy_seconds(), time.time()
    yield
    row = {"test": item.nodeid, "cpu_s": round(busy_seconds() - busy, 1), "wall_s": round(time.time() - started, 1)}
    item.config._cpu_rows.append(row)  # type: ignore[attr-defined]
    if item.config.getoption("--cpu-log"):
        with open(item.config.getoption("--cpu-log"), "a") as log:
            log.write(json.dumps(row) + "\n")


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    rows = config._cpu_rows  # type: ignore[attr-defined]
    if not rows:
        return
    write = terminalreporter.write_line
    terminalreporter.section("machine CPU-seconds per test (set-up and teardown included)")
    for row in sorted(rows, key=lambda r: -r["cpu_s"])[:config.getoption("--cpu-top")]:
        write(f"{row['cpu_s']:7.1f} CPU-s {row['wall_s']:7.1f} s  {row['test']}")
    per_file = collections.Counter()
    for row in rows:
        per_file[row["test"].split("::")[0]] += row["cpu_s"]
    write("per file: " + ", ".join(f"{name} {cpu:.0f}" for name, cpu in per_file.most_common()))
    write(f"all tests: {sum(r['cpu_s'] for r in rows):.0f} CPU-s over {sum(r['wall_s'] for r in rows):.0f} s")
