"""Sink stage: writes each row's image, then one manifest part per shard in the batch, which commits those rows.

Last stage of the flow. Names are deterministic, so a retried unit rewrites the same objects instead of adding
more. It returns one small accounting row per input row (no images, no embeddings): the driver counts those to
show progress and to know when a shard is complete.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from actors.models.seeds import NO_SEED
from actors.stages import trace
from orchestrator.output import images as image_layout
from orchestrator.output.manifest import (MANIFEST_COLUMNS, OK, SKIPPED, Manifest, ShardFrame, manifest_table, part_key,
                                          row_key)

# What the driver receives for every row that reached the sink.
ACCOUNT_COLUMNS = ("shard", "shard_row", "shard_rows", "shard_base", "shard_frame", "planned", "tally", "status",
                   "error")


def write_unit(batch: dict[str, np.ndarray], *, manifest: Manifest, run_fields: dict, image_format: str,
               image_output: str, save_images: bool = True) -> dict[str, np.ndarray]:
    """Commit one unit of work (a batch of rated rows); returns its accounting rows."""
    by_shard: dict[str, list[int]] = defaultdict(list)
    for i, status in enumerate(batch["status"]):
        if status != SKIPPED:  # a tally of rows delivered before: nothing to write
            by_shard[str(batch["shard"][i])].append(i)
    for shard, indices in by_shard.items():
        rows = [manifest_row(batch, i, run_fields) for i in indices]
        if save_images:
            _write_images(manifest, shard, batch, indices, rows, image_format, image_output)
        frame = ShardFrame.from_json(str(batch["shard_frame"][indices[0]]))
        manifest.commit_part(shard, manifest_table(rows), frame)
    trace.mark("sink", "unit committed")
    return {name: np.asarray(batch[name]) for name in ACCOUNT_COLUMNS}


def manifest_row(batch: dict[str, np.ndarray], i: int, run_fields: dict) -> dict:
    """One committed row from a row in flight: numpy scalars to Python values, placeholders to nulls."""
    row = {name: _plain(batch[name][i]) for name in MANIFEST_COLUMNS if name in batch}
    row.update(run_fields)
    if row.get("seed") == NO_SEED:  # a quarantined corpus row has no seed
        row["seed"] = row["candidate_index"] = row["rank"] = None
    for name in ("prompt", "error"):  # rows travel with "" for "none"; the manifest says null
        row[name] = row.get(name) or None
    if row.get("status") != OK:  # a row that was not rendered has no preview and cost no steps
        for name in ("preview_candidates", "preview_scores", "preview_steps", "steps_spent"):
            row.pop(name, None)
    elif "steps_spent" not in row:
        row["steps_spent"] = row["steps"]
    return row


def _write_images(manifest: Manifest, shard: str, batch, indices: list[int], rows: list[dict], image_format: str,
                  image_output: str) -> None:
    """Images before their part: one object each (files), or one small tar for the unit (shards)."""
    ok = [(i, row) for i, row in zip(indices, rows) if row["status"] == OK]
    if not ok:
        return
    encoded = [image_layout.encode_image(batch["image"][i], image_format) for i, _ in ok]
    if image_output == "files":
        for (_, row), data in zip(ok, encoded):
            row["image_key"] = image_layout.file_image_key(row["prompt_id"], row["seed"], image_format)
            manifest.output.write_bytes(row["image_key"], data)
        return
    extension = image_layout.EXTENSIONS[image_format]
    names = [f"{image_layout.sample_key(row['prompt_id'], row['seed'])}.{extension}" for _, row in ok]
    data, members = image_layout.pack_images(names, encoded)
    key = part_key(shard, [row_key(r["prompt_id"], r["seed"], r["source"]) for r in rows], suffix="tar")
    manifest.output.write_bytes(key, data)
    for (_, row), member in zip(ok, members):
        row.update(image_key=key, image_member=member.name, image_offset=member.offset, image_size=member.size)


def _plain(value):
    """numpy scalars to Python values (NaN to None), so manifest rows build under the schema."""
    if isinstance(value, np.ndarray):  # a list column (the preview policy's per-candidate values)
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value

