"""Manifest schema, object keys and commit-part names: the contract between the sink and every reader of outputs.

Last stage of the flow. One manifest row reproduces one image; a manifest part is the commit marker of its rows.
"""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa

MANIFEST_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("source", pa.string()),
        ("seed", pa.int64()),
        ("candidate_index", pa.int32()),
        ("rank", pa.int32()),
        ("predicted_score", pa.float64()),
        ("prompt_predicted_mean", pa.float64()),  # over all N candidates: how good this prompt's seeds look
        ("prompt_predicted_std", pa.float64()),  # their spread: how much choosing a seed can gain
        ("score", pa.float64()),
        ("image_uri", pa.string()),
        ("model", pa.string()),
        ("scheduler", pa.string()),
        ("steps", pa.int32()),
        ("guidance", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("policy", pa.string()),
        ("rater", pa.string()),
        ("run_id", pa.string()),
        ("truncated", pa.bool_()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)
STATUSES = ("ok", "quarantined", "failed")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _short_hash(text: str, size: int = 4) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=size).hexdigest()


def safe_key(prompt_id: str) -> str:
    """A file-name-safe key for a user-supplied id: it can never contain '/', '.' or '..' and so never escapes.

    Ids that needed changing get a hash suffix, so two ids that sanitise alike still get different keys.
    """
    cleaned = _UNSAFE.sub("_", prompt_id)[:80]
    if cleaned != prompt_id or not cleaned:
        cleaned = f"{cleaned}-{_short_hash(prompt_id)}"
    return cleaned


def image_key(prompt_id: str, seed: int, image_format: str = "png") -> str:
    """Deterministic key of an image under the output root, sharded over 256 folders by prompt."""
    return f"images/{_short_hash(prompt_id, 1)}/{safe_key(prompt_id)}_{int(seed)}.{image_format}"


def row_key(prompt_id: str, seed, source: str) -> tuple[str, str]:
    """What identifies a row for exactly-once: (prompt_id, seed), or for a row without a seed (quarantined) its
    source line, so several quarantined copies of one id are each delivered once."""
    if seed is not None and int(seed) >= 0:
        return (prompt_id, str(int(seed)))
    return (prompt_id, f"source:{source}")


def part_key(pairs: list[tuple[str, str]]) -> str:
    """Manifest part key named by its content (row keys), so a retried unit of work rewrites the same object."""
    digest = hashlib.blake2b(digest_size=12)
    for prompt_id, seed in sorted(pairs):
        digest.update(f"{prompt_id}\x1f{seed}\x1e".encode("utf-8"))
    return f"manifest/part-{digest.hexdigest()}.parquet"


def manifest_table(rows: list[dict]) -> pa.Table:
    """Rows as a manifest table; missing columns become nulls, extra keys are refused."""
    extra = set().union(*(row.keys() for row in rows)) - set(MANIFEST_COLUMNS) if rows else set()
    if extra:
        raise ValueError(f"manifest rows have unknown columns: {', '.join(sorted(extra))}")
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
