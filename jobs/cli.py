"""The `seedsift` command: one subcommand per job module, each also runnable as `python -m jobs.NAME`.

Only dispatches; every job's flags and behaviour live in its own module.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

from jobs.common import exit_without_teardown

JOBS = {
    "generate": "render k selected seeds per prompt for a corpus",
    "collect": "render and rate all N candidates per prompt into a predictor training set",
    "train": "train the noise-quality predictor on a collected set",
    "evaluate": "score a collected set with a predictor and report how well it picks seeds",
    "reproduce": "rebuild one image from its manifest row",
    "verify": "check an output's exactly-once invariants (duplicates, missing images, orphans)",
    "manifest": "write every committed row of an output, exactly once, to one Parquet file",
    "report": "rebuild OUT/report.html: the images with prompts and scores, quarantined and failed rows",
    "search-solver": "search a solver schedule with K model calls for a model (S3), for --scheduler schedule:PATH",
}

# Jobs that start no Ray and write nothing after their result is printed: they may leave the process without the
# interpreter's teardown (see exit_without_teardown).
READ_ONLY = ("verify", "manifest", "report")


def entry() -> NoReturn:
    """The `seedsift` console command."""
    argv = sys.argv[1:]
    status = main(argv)
    if argv and argv[0] in READ_ONLY:
        exit_without_teardown(status)
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in JOBS:
        import difflib

        width = max(map(len, JOBS))
        lines = [f"  {name:<{width}}  {text}" for name, text in JOBS.items()]
        usage = "usage: seedsift JOB [flags]   (seedsift JOB --help for its flags)\n\njobs:\n" + "\n".join(lines)
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            return 0
        if argv:
            close = difflib.get_close_matches(argv[0], JOBS, n=1)
            print(f"seedsift: unknown job {argv[0]!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                  file=sys.stderr)
        print(usage, file=sys.stderr)
        return 2
    return importlib.import_module(f"jobs.{argv[0].replace('-', '_')}").main(argv[1:])  # search-solver


if __name__ == "__main__":
    entry()
