"""Check an output's exactly-once invariants: every committed row once, every ok row's image present, no strays.

Run as `seedsift verify --out OUT` or `python -m jobs.verify --out OUT`; prints a JSON report and exits 0 when the
output is clean, 1 when it is not (2 when it cannot be read). `--repair` moves every damaged manifest object and
an unreadable run.json aside (under damaged/, never deleted), so the next run with the same command redoes the
rows they held. Works on local folders and s3:// prefixes, on both
image layouts, on outputs of seedsift 0.1, and under any spelling of the output's path: rows locate their images
relative to the output root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter

import numpy as np
import pyarrow as pa

from jobs.common import add_storage_options
from orchestrator.output.manifest import (
    DELIVERED,
    FAILED,
    OPEN_FOLDER,
    RUN_FILE,
    DamagedManifest,
    Manifest,
    complete_key,
    legacy_to_current,
    row_keys,
)
from orchestrator.output.storage import TEMPORARY_MARK, Output
from orchestrator.run.config import ConfigError

LISTED = 20  # examples per problem kept in the report
COLUMNS = ["prompt_id", "seed", "source", "status", "image_key", "image_member", "image_offset", "image_size"]
REPAIR_FOLDER = "damaged"  # where --repair moves damaged objects, under a UTC time stamp: kept, never deleted


def _digests(values: list) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(repr(v).encode(), digest_size=8).digest(), "big")
                     for v in values], dtype=np.uint64)


class _Check:
    """What verify accumulates: row identities (as 64-bit digests), images expected, problems found."""

    def __init__(self):
        self.delivered: list[np.ndarray] = []
        self.examples: dict[int, tuple] = {}
        self.status = Counter()
        self.duplicates: Counter = Counter()
        self.failed = 0
        self.failed_retried = 0
        self.expected_files: dict[str, tuple] = {}  # image key -> row (files layout and 0.1 outputs)
        self.expected_members: list[tuple] = []  # (tar key, offset, size, row) inside WebDataset tars
        self.stale_rows = 0
        self.damaged: list[tuple[str, str]] = []  # (key, what is wrong with it)

    def add(self, table: pa.Table) -> None:
        keys = row_keys(table)
        statuses = table["status"].to_pylist()
        seen_here: Counter = Counter()
        delivered_keys = {k for k, s in zip(keys, statuses) if s in DELIVERED}
        for key, status in zip(keys, statuses):
            self.status[status] += 1
            if status == FAILED:
                self.failed += 1
                self.failed_retried += key in delivered_keys
                continue
            seen_here[key] += 1
        for key, copies in seen_here.items():
            if copies > 1:
                self.duplicates[key] += copies - 1
        unique = list(seen_here)
        digests = _digests(unique)
        self.delivered.append(digests)
        for digest, key in zip(digests[:LISTED].tolist(), unique[:LISTED]):
            self.examples.setdefault(digest, key)
        for row, status in zip(table.select(COLUMNS).to_pylist(), statuses):
            if status != "ok" or not row["image_key"]:  # collect --no-images commits ok rows without images
                continue
            if row["image_member"]:
                self.expected_members.append((row["image_key"], row["image_offset"], row["image_size"], row))
            else:
                self.expected_files[row["image_key"]] = (row["prompt_id"], row["seed"])

    def cross_shard_duplicates(self) -> int:
        if not self.delivered:
            return 0
        everything = np.concatenate(self.delivered)
        values, counts = np.unique(everything, return_counts=True)
        repeated = values[counts > 1]
        for digest in repeated.tolist()[:LISTED]:
            self.duplicates[self.examples.get(digest, ("<row in another shard>", str(digest)))] += 0
        return int((counts[counts > 1] - 1).sum())


def verify_output(output: Output | str, storage_options: dict | None = None) -> dict:
    """The exactly-once report of one output. `clean`: no duplicate, no missing image, no damaged object;
    `strict_clean` also wants no orphan image, no leftover part and no temporary file (all normal just after a
    crash, gone after a rerun)."""
    if isinstance(output, str):
        output = Output(output, storage_options)
    output.fs.invalidate_cache()  # listings cached by s3fs in this process may predate the run being checked
    manifest = Manifest(output)
    check = _Check()
    try:
        manifest.read_run()
    except DamagedManifest as exc:
        check.damaged.append((RUN_FILE, str(exc)))
    legacy = manifest.legacy_parts()
    complete = manifest.complete_sizes()
    open_parts = manifest.open_parts()
    if legacy:
        for key in legacy:
            try:
                check.add(legacy_to_current(output.read_table(key)))
            except (pa.ArrowException, DamagedManifest) as exc:
                check.damaged.append((key, f"{key}: {exc}"))
    for shard in complete:
        try:
            table = manifest.read_complete(shard, COLUMNS)
        except DamagedManifest as exc:
            check.damaged.append((complete_key(shard), str(exc)))
            continue
        check.add(table)
        known = set(row_keys(table))
        for key in open_parts.get(shard, []):  # left by a kill during compaction: nothing the shard lacks
            try:
                part, _ = manifest.read_part(key, COLUMNS)
            except DamagedManifest as exc:
                check.damaged.append((key, str(exc)))
                continue
            check.stale_rows += sum(k not in known for k in row_keys(part))
    for shard, parts in open_parts.items():
        if shard in complete:
            continue
        tables = []
        for key in parts:
            try:
                tables.append(manifest.read_part(key, COLUMNS)[0])
            except DamagedManifest as exc:
                check.damaged.append((key, str(exc)))
        if tables:
            check.add(pa.concat_tables(tables))
    cross = check.cross_shard_duplicates()

    stored_files, stored_tars = set(), {}
    for key, size in output.list_sizes("images").items():
        if key.endswith(".tar"):
            stored_tars[key] = size
        else:
            stored_files.add(key)
    temporaries = _temporaries(output)
    open_tars = output.list_sizes(OPEN_FOLDER, ".tar")
    missing = sorted(key for key in check.expected_files if key not in stored_files)
    orphans = sorted(stored_files - set(check.expected_files))
    referenced_tars = {key for key, *_ in check.expected_members}
    all_tars = {**stored_tars, **open_tars}
    missing_members = []
    for tar, offset, size, row in check.expected_members:
        if tar not in all_tars or offset is None or offset + size > all_tars[tar]:
            missing_members.append(f"{tar}#{row['image_member']}")
    missing += sorted(missing_members)
    orphans += sorted(set(stored_tars) - referenced_tars)
    orphans += sorted(key for key in open_tars if key[:-4] + ".parquet" not in
                      {p for parts in open_parts.values() for p in parts})
    leftover_parts = sorted(p for shard in complete for p in open_parts.get(shard, []))

    duplicates = sum(check.duplicates.values()) + cross
    report = {
        "output": output.uri,
        "layout": "0.1 (flat parts)" if legacy else "sharded",
        "complete_shards": len(complete),
        "open_shards": len(set(open_parts) - set(complete)),
        "manifest_objects": len(legacy) + len(complete) + sum(len(p) for p in open_parts.values()),
        "committed_rows": sum(check.status.values()) - check.failed_retried,
        "delivered_rows": sum(n for s, n in check.status.items() if s in DELIVERED),
        "rows_by_status": dict(sorted(check.status.items())),
        "duplicates": duplicates,
        "duplicate_examples": [{"row": list(k), "copies": n + 1} for k, n in list(check.duplicates.items())[:LISTED]],
        "failed_rows": check.failed,
        "failed_rows_retried_since": check.failed_retried,
        "missing_images": len(missing),
        "missing_image_examples": missing[:LISTED],
        "orphan_images": len(orphans),
        "orphan_image_examples": orphans[:LISTED],
        "leftover_parts": len(leftover_parts),
        "leftover_rows_not_in_their_shard": check.stale_rows,
        "damaged_objects": len(check.damaged),
        "damaged_object_examples": [message for _, message in check.damaged[:LISTED]],
        "damaged_object_keys": [key for key, _ in check.damaged],
        "temporary_files": len(temporaries),
        "temporary_file_examples": sorted(temporaries)[:LISTED],
    }
    report["clean"] = duplicates == 0 and not missing and not check.damaged and check.stale_rows == 0
    report["strict_clean"] = (report["clean"] and not orphans and not temporaries and not leftover_parts)
    return report


def repair_output(output: Output, lease_seconds: float = 120.0) -> dict:
    """Move every damaged manifest object (and an unreadable run.json) aside under damaged/<UTC time>/, holding
    the output's lease so no run writes meanwhile. A damaged shard object or part no longer counts, so the next
    run redoes its rows and rewrites their images; a run.json moved aside is written again by that run."""
    from orchestrator.output.lease import Lease

    lease = Lease(output, lease_seconds, busy_advice="Run `seedsift verify --repair` again when it has finished")
    lease.acquire()
    try:
        damaged = verify_output(output)["damaged_object_keys"]
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved = []
        for key in damaged:
            companions = [key[:-len(".parquet")] + ".tar"] if key.startswith(OPEN_FOLDER) else []
            for each in [key, *(c for c in companions if output.exists(c))]:  # a part's mini-tar goes with it
                output.move(each, f"{REPAIR_FOLDER}/{stamp}/{each}")
                moved.append(each)
    finally:
        lease.release()
    return {"output": output.uri, "moved": moved, "moved_to": f"{REPAIR_FOLDER}/{stamp}/" if moved else None}


def _temporaries(output: Output) -> list[str]:
    """Temporary files of interrupted local writes (an S3 PUT leaves none)."""
    if not output.is_local:
        return []
    import os

    found = []
    for folder, _, files in os.walk(output.path("")):
        found += [output.key_of(os.path.join(folder, name)) for name in files if TEMPORARY_MARK in name]
    return found


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="seedsift verify", description=__doc__.splitlines()[0])
    result.add_argument("--out", required=True, help="output folder or s3:// prefix to check")
    result.add_argument("--strict", action="store_true",
                        help="also fail on orphan images, leftover parts and temporary files (normal after a crash)")
    result.add_argument("--repair", action="store_true",
                        help="move damaged manifest objects and an unreadable run.json aside (under damaged/); the "
                             "next run with the same command redoes their rows")
    add_storage_options(result)
    return result


def main(argv: list[str] | None = None) -> int:
    from orchestrator.output.lease import OutputBusy

    args = parser().parse_args(argv)
    try:
        output = Output(args.out, args.storage_options)
        Manifest(output).require_run()  # a typo, a corpus folder, a missing bucket: never "clean", nothing created
        if args.repair:
            repaired = repair_output(output)
            print(json.dumps(repaired, indent=2))
            if repaired["moved"]:
                print(f"seedsift verify: moved {len(repaired['moved'])} damaged object(s) to "
                      f"{output.uri_of(repaired['moved_to'])}; rerun the same command to redo their rows",
                      file=sys.stderr)
            return 0
        report = verify_output(output)
    except OutputBusy as exc:  # --repair waits for no one: the run holding the output may still fix it
        print(f"seedsift verify: {exc}", file=sys.stderr)
        return 4
    except ConfigError as exc:
        print(f"seedsift verify: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"seedsift verify: cannot read {args.out}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0 if report["strict_clean" if args.strict else "clean"] else 1


if __name__ == "__main__":
    from jobs.common import exit_without_teardown

    exit_without_teardown(main())
