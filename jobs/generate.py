"""The generate job: a corpus in, k selected images per prompt out, with Parquet manifests and a summary.

Run as `seedsift generate ...` or `python -m jobs.generate ...` (the form `ray job submit` uses).
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import add_run_arguments, config_from_args, run_job
from orchestrator import pipeline


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="seedsift generate", description=__doc__.splitlines()[0])
    add_run_arguments(result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        summary = pipeline.run(config_from_args(args))
        print(json.dumps(summary, indent=2))
        return 0  # failed rows are in the manifest and the summary, and a rerun retries them

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
