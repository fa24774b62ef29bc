"""The driver's shard ledger: which corpus rows of each open shard are accounted for, and when a shard is complete.

Fed by the sink's accounting rows (one per row that reached it); read by the pipeline, which compacts a shard as
soon as every one of its corpus rows is delivered. It holds only the shards in flight, never the corpus: a
shard leaves the ledger when it completes.

A corpus row is accounted for when its delivered rows reach what the policy planned for it (k, or the budget's
choice; 1 for a quarantined row). Delivered means committed ok or quarantined in this run, or delivered by an
earlier run (the scorer's tally rows say how many). Failed rows count for nothing: their shard stays open, and
the next run retries them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from orchestrator.output.manifest import DELIVERED, SKIPPED, ShardFrame


@dataclass
class _OpenShard:
    rows: int  # corpus rows of the shard in this run's read
    base: int  # rows complete before this run and not read again
    frame: str  # the reader's ShardFrame (JSON)
    planned: dict[int, int] = field(default_factory=dict)
    delivered: dict[int, int] = field(default_factory=dict)
    done: int = 0


class ShardLedger:
    def __init__(self):
        self.open: dict[str, _OpenShard] = {}
        self.totals = {"rows": 0, "images": 0, "failed": 0, "quarantined": 0, "skipped": 0}
        self.skipped_by_shard: dict[str, int] = {}  # rows read again and found delivered already, per shard

    def add(self, accounts: dict[str, np.ndarray]) -> list[tuple[str, ShardFrame]]:
        """Take one batch of accounting rows; returns the shards it completed, with their frames."""
        completed = []
        for shard, row, rows, base, frame, planned, tally, status in zip(
                accounts["shard"], accounts["shard_row"], accounts["shard_rows"], accounts["shard_base"],
                accounts["shard_frame"], accounts["planned"], accounts["tally"], accounts["status"]):
            shard, row, status = str(shard), int(row), str(status)
            self._count(status, int(tally))
            if status == SKIPPED:
                self.skipped_by_shard[shard] = self.skipped_by_shard.get(shard, 0) + int(tally)
            entry = self.open.get(shard)
            if entry is None:
                entry = self.open[shard] = _OpenShard(rows=int(rows), base=int(base), frame=str(frame))
            if status == SKIPPED:
                gained = int(tally)
            elif status in DELIVERED:
                gained = 1
            else:
                gained = 0
            entry.planned[row] = int(planned)
            before = entry.delivered.get(row, 0)
            entry.delivered[row] = before + gained
            if before < entry.planned[row] <= before + gained:
                entry.done += 1
            if entry.done + entry.base >= entry.rows:
                completed.append((shard, ShardFrame.from_json(entry.frame)))
                del self.open[shard]
        return completed

    def _count(self, status: str, tally: int) -> None:
        if status == SKIPPED:
            self.totals["skipped"] += tally
            return
        self.totals["rows"] += 1
        key = {"ok": "images", "failed": "failed", "quarantined": "quarantined"}.get(status)
        if key:
            self.totals[key] += 1
