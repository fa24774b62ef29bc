"""The generate job: a corpus in, k selected images per prompt out, with Parquet manifests and a summary.

Run as `seedsift generate ...` or `python -m jobs.generate ...` (the form `ray job submit` uses).
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import add_run_arguments, check_prompts, config_from_args, finished, run_job
from orchestrator.flow.console import Console
from orchestrator.output.storage import Output


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="seedsift generate", description=__doc__.splitlines()[0])
    add_run_arguments(result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        config = config_from_args(args)
        check_prompts(config)  # a corpus that cannot be read stops here, before torch and Ray are imported
        from jobs.pages.report import write_report
        from orchestrator.flow import pipeline

        summary = pipeline.run(config, console)
        console.finish(summary, write_report(Output(config.out, config.storage_options)))
        return finished(summary, console)  # failed rows are in the manifest and the summary; a rerun retries them

    with Console(verbose=args.verbose, as_json=args.json) as console:
        return run_job(body, output=args.out)


if __name__ == "__main__":
    sys.exit(main())
