"""The rows' own vocabulary, which the stages produce and the manifest commits: statuses and the key by which a row
occurs once in an output. Defined here, below both, so a stage needs nothing of the driver's bookkeeping."""

from __future__ import annotations

from typing import Protocol

# Statuses, defined once. Delivered rows are done; failed rows are retried by the next run.
OK, QUARANTINED, FAILED = "ok", "quarantined", "failed"
STATUSES = (OK, QUARANTINED, FAILED)
DELIVERED = (OK, QUARANTINED)
# Only between stages, never committed: a tally of a corpus row's rows that an earlier run already delivered,
# so the driver can account for every corpus row of a shard without reading storage.
SKIPPED = "skipped"


def row_key(prompt_id: str, seed, source: str) -> tuple[str, str]:
    """What occurs once in an output: (prompt_id, seed) for a rendered candidate; a row without a seed (a
    quarantined corpus row) is named by its corpus position, so several quarantined copies of one id are each
    delivered once."""
    if seed is not None and int(seed) >= 0:
        return (prompt_id, str(int(seed)))
    return (prompt_id, f"source:{source}")


class DeliveredRows(Protocol):
    """What a scorer asks of the output (the orchestrator's Manifest is one): the row keys of one shard that earlier
    runs delivered."""

    def delivered_keys(self, shard: str) -> set: ...
