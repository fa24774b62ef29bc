"""The collect job: renders and rates all N candidate seeds of each prompt, and writes a predictor training set.

Run as `seedsift collect ...` with generate's flags; the same run seed gives the same candidate seeds as generate.
"""

from __future__ import annotations

import argparse
import sys

import pyarrow as pa
import pyarrow.compute as pc

from jobs.common import add_run_arguments, check_prompts, config_from_args, finished, run_job
from orchestrator.flow.console import Console
from orchestrator.output.dataset import DATASET_FILE
from orchestrator.output.manifest import MANIFEST_SCHEMA, Manifest
from orchestrator.output.storage import Output

DATASET_COLUMNS = ["prompt_id", "prompt", "seed", "candidate_index", "score", "model", "scheduler", "attention",
                   "steps", "guidance", "width", "height", "rater", "run_id"]


def write_dataset(output: Output) -> int:
    """Gather the committed rows into OUT/dataset.parquet (seeds, not noise: noise is re-derived); returns rows."""
    tables = [t.filter(pc.equal(t["status"], "ok")).select(DATASET_COLUMNS)
              for t in Manifest(output).iter_tables(DATASET_COLUMNS + ["status"])]
    table = pa.concat_tables(tables) if tables else pa.schema([MANIFEST_SCHEMA.field(c) for c in DATASET_COLUMNS]).empty_table()
    table = table.sort_by([("prompt_id", "ascending"), ("candidate_index", "ascending")])
    output.write_table(DATASET_FILE, table)
    return table.num_rows


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="seedsift collect", description=__doc__.splitlines()[0])
    add_run_arguments(result)
    result.add_argument("--no-images", action="store_true", help="rate the images but do not store them")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        config = config_from_args(args, all_candidates=True, keep=args.candidates, save_images=not args.no_images)
        check_prompts(config)  # a corpus that cannot be read stops here, before torch and Ray are imported
        from jobs.pages.report import write_report
        from orchestrator.flow import pipeline

        summary = pipeline.run(config, console)
        output = Output(config.out, config.storage_options)
        summary["dataset_rows"] = write_dataset(output)
        summary["dataset"] = output.uri_of(DATASET_FILE)
        output.write_json(pipeline.SUMMARY_FILE, summary)
        console.finish(summary, write_report(output))
        if not args.json:
            print(f"training set: {summary['dataset']} ({summary['dataset_rows']:,} rated candidates)")
        return finished(summary, console)

    with Console(verbose=args.verbose, as_json=args.json) as console:
        return run_job(body, output=args.out)


if __name__ == "__main__":
    sys.exit(main())
