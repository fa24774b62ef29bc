"""The report job: `seedsift report OUT` rebuilds OUT/report.html (the page itself: jobs/pages/report.py)."""

from __future__ import annotations

import argparse

from jobs.common import add_storage_options, run_job
from jobs.pages.report import write_report
from orchestrator.output.storage import Output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seedsift report", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the run's output folder or s3:// prefix")
    add_storage_options(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        print(write_report(Output(args.out, args.storage_options)))
        return 0

    return run_job(body)


if __name__ == "__main__":
    from jobs.common import exit_without_teardown

    exit_without_teardown(main())
