"""Sink stage: writes each row's image, then the unit's manifest part, which commits those rows.

Last stage of the flow. Names are deterministic, so a retried unit rewrites the same objects instead of adding more.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from orchestrator.manifest import MANIFEST_COLUMNS, image_key, manifest_table, part_key, row_key
from orchestrator.storage import Output


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format.upper())
    return buffer.getvalue()


def write_unit(
    batch: dict[str, np.ndarray], *, output: Output, run_fields: dict, image_format: str, save_images: bool = True
) -> pa.Table:
    """Write one unit of work (a batch of rated rows); returns its manifest rows, already committed."""
    rows = []
    for i in range(len(batch["status"])):
        row = {name: _plain(batch[name][i]) for name in MANIFEST_COLUMNS if name in batch}
        row.update(run_fields)
        if row["status"] == "ok" and save_images:
            key = image_key(row["prompt_id"], row["seed"], image_format)
            output.write_bytes(key, encode_image(batch["image"][i], image_format))
            row["image_uri"] = output.uri_of(key)
        if row.get("seed", -1) < 0:  # a quarantined prompt has no seed
            row["seed"] = row["candidate_index"] = None
        row["prompt"] = row.get("prompt") or None  # rows travel with "" for "no prompt"; the manifest says null
        rows.append(row)
    table = manifest_table(rows)
    output.write_table(part_key([row_key(r["prompt_id"], r["seed"], r["source"]) for r in rows]), table)
    return table


def _plain(value):
    """numpy scalars to Python values (NaN to None), so manifest rows build under the schema."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value
