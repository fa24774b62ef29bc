"""The manifest job: every committed row of an output, exactly once, in one Parquet file.

Run as `seedsift manifest --out OUT --to FILE.parquet`. Works in any state of the output (mid-run, after a kill,
after compaction) and on both image layouts; each row gains `image_uri`, its image's location under OUT as
given here (for a row inside a WebDataset tar: the tar's URI, with `image_member`, `image_offset`, `image_size`).
"""

from __future__ import annotations

import argparse
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import add_storage_options, run_job
from orchestrator.output.manifest import MANIFEST_SCHEMA, Manifest
from orchestrator.output.storage import Output

EXPORT_SCHEMA = MANIFEST_SCHEMA.append(pa.field("image_uri", pa.string()))


def export(output: Output, target: str, storage_options: dict | None = None) -> int:
    """Write the output's committed rows to `target` (a local path or URI), shard by shard; returns the rows."""
    manifest = Manifest(output)
    manifest.require_run()
    rows = 0
    with fsspec.open(target, "wb", **(storage_options or {})) as handle:
        with pq.ParquetWriter(handle, EXPORT_SCHEMA, compression="zstd") as writer:
            for table in manifest.iter_tables():
                keys = table["image_key"].to_pylist()
                uris = pa.array([output.uri_of(key) if key else None for key in keys], pa.string())
                table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA).append_column("image_uri", uris)
                writer.write_table(table)
                rows += table.num_rows
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seedsift manifest", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the run's output folder or s3:// prefix")
    parser.add_argument("--to", required=True, help="Parquet file to write (local path or URI)")
    add_storage_options(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        options = args.storage_options
        rows = export(Output(args.out, options), args.to, options)
        print(json.dumps({"rows": rows, "written": args.to}))
        return 0

    return run_job(body)


if __name__ == "__main__":
    from jobs.common import exit_without_teardown

    exit_without_teardown(main())
