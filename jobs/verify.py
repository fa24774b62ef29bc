"""Check an output's exactly-once invariants: every committed row once, every ok row's image present, no strays.

Run as `seedsift verify --out OUT` or `python -m jobs.verify --out OUT`; prints a JSON report and exits 0 when the
output is clean, 1 when it is not (2 when it cannot be read). Works on local folders and s3:// prefixes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from orchestrator.storage import TEMPORARY_MARK, Output

LISTED = 20  # examples per problem kept in the report


def row_identity(prompt_id: str, seed, source) -> tuple:
    """What must occur once: (prompt_id, seed) for a rendered candidate; (prompt_id, source) for a seedless row.

    A quarantined row has no seed; its corpus position (source) names it, so two quarantined copies of one id at
    different lines are two rows, not a duplicate.
    """
    return (prompt_id, int(seed)) if seed is not None else (prompt_id, f"source:{source}")


def _relative_key(output: Output, uri_or_path: str) -> str:
    for prefix in (output.uri + "/", output.path("") + "/"):
        if uri_or_path.startswith(prefix):
            return uri_or_path[len(prefix):]
    return uri_or_path


def verify_output(output: Output | str, storage_options: dict | None = None) -> dict:
    """The exactly-once report of one output. `clean`: no duplicate and no missing image; `strict_clean` also
    wants no orphan image and no leftover temporary file (both normal just after a crash, gone after a rerun)."""
    if isinstance(output, str):
        output = Output(output, storage_options)
    output.fs.invalidate_cache()  # listings cached by s3fs in this process may predate the run being checked
    parts = output.list_keys("manifest", ".parquet")
    columns = ["prompt_id", "seed", "source", "status", "image_uri"]
    identities: Counter = Counter()  # delivered rows (ok, quarantined): each must occur once
    failed: Counter = Counter()  # failed rows are retried by the next run, which commits the row again
    status_counts: Counter = Counter()
    expected_images: dict[str, tuple] = {}
    for part in parts:  # part by part: memory holds identities, never a whole manifest
        table = output.read_tables([part], columns)
        for prompt_id, seed, source, status, image_uri in zip(*(table[c].to_pylist() for c in columns)):
            identity = row_identity(prompt_id, seed, source)
            (failed if status == "failed" else identities)[identity] += 1
            status_counts[status] += 1
            if status == "ok" and image_uri:  # collect --no-images commits ok rows without images
                expected_images[_relative_key(output, image_uri)] = identity
    duplicates = {identity: n for identity, n in identities.items() if n > 1}

    stored = set()
    images_root = output.path("images")
    temporaries = []
    if output.fs.exists(images_root):
        for path in output.fs.find(images_root):
            key = _relative_key(output, path if not output.is_local else os.path.abspath(path))
            if TEMPORARY_MARK in key:
                temporaries.append(key)
            else:
                stored.add(key)
    if output.is_local:  # manifest and top-level temporaries too (an S3 PUT leaves none)
        for folder, _, files in os.walk(output.path("")):
            if os.path.abspath(folder).startswith(os.path.abspath(images_root)):
                continue
            temporaries += [_relative_key(output, os.path.join(folder, f)) for f in files if TEMPORARY_MARK in f]
    missing = sorted(key for key in expected_images if key not in stored)
    orphans = sorted(stored - set(expected_images))

    report = {
        "output": output.uri,
        "manifest_parts": len(parts),
        "committed_rows": sum(identities.values()) + sum(failed.values()),
        "delivered_rows": sum(identities.values()),
        "distinct_rows": len(identities),
        "rows_by_status": dict(sorted(status_counts.items())),
        "duplicates": sum(n - 1 for n in duplicates.values()),
        "duplicate_examples": [{"row": list(k), "copies": n} for k, n in list(duplicates.items())[:LISTED]],
        "failed_rows": sum(failed.values()),
        "failed_rows_retried_since": sum(n for k, n in failed.items() if k in identities),
        "missing_images": len(missing),
        "missing_image_examples": missing[:LISTED],
        "orphan_images": len(orphans),
        "orphan_image_examples": orphans[:LISTED],
        "temporary_files": len(temporaries),
        "temporary_file_examples": sorted(temporaries)[:LISTED],
    }
    report["clean"] = report["duplicates"] == 0 and report["missing_images"] == 0
    report["strict_clean"] = report["clean"] and report["orphan_images"] == 0 and report["temporary_files"] == 0
    return report


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="seedsift verify", description=__doc__.splitlines()[0])
    result.add_argument("--out", required=True, help="output folder or s3:// prefix to check")
    result.add_argument("--strict", action="store_true",
                        help="also fail on orphan images and leftover temporary files (normal right after a crash)")
    result.add_argument("--storage-options", default="{}", help="JSON fsspec storage options")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        report = verify_output(Output(args.out, json.loads(args.storage_options)))
    except (OSError, ValueError) as exc:
        print(f"seedsift verify: cannot read {args.out}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0 if report["strict_clean" if args.strict else "clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
