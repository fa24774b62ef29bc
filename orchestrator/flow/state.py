"""The run's state on the driver: what the output held when the run started (OutputState), and the run in flight
handed on as one object (RunState)."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.corpus.dedup import Owners
from orchestrator.corpus.listing import CorpusFile
from orchestrator.corpus.reader import Corpus, file_key
from orchestrator.output.lease import Lease
from orchestrator.output.ledger import ShardLedger
from orchestrator.output.manifest import DELIVERED, Manifest, ShardRecord, split_shard_id
from orchestrator.run.plan import RunPlan


@dataclass
class OutputState:
    """What the output held when the run started: complete shards (their records) and open parts."""

    records: dict[str, ShardRecord]
    open_parts: dict[str, list[str]]

    @classmethod
    def read(cls, manifest: Manifest) -> OutputState:
        return cls(records=manifest.complete_records(), open_parts=manifest.open_parts())

    @property
    def committed_shards(self) -> frozenset:
        return frozenset(self.records) | frozenset(self.open_parts)

    def owners(self, files: list[CorpusFile]) -> Owners:
        """The file numbering every duplicate-index actor of the run shares: the corpus's files, then any other
        file the output holds rows of (a file since removed from the corpus)."""
        return Owners([file_key(f.name) for f in files] + sorted({split_shard_id(s)[0] for s in self.committed_shards}))

    def complete_frames(self) -> dict[str, dict]:
        """{file key: {shard index: frame}} of complete shards, for the reader to skip."""
        frames: dict[str, dict] = {}
        for shard, record in self.records.items():
            key, index = split_shard_id(shard)
            frames.setdefault(key, {})[index] = record.frame
        return frames

    def delivered_rows(self) -> int:
        return sum(self.delivered_in(shard) for shard in self.records)

    def delivered_in(self, shard: str) -> int:
        return sum(self.records[shard].stats.get("by_status", {}).get(s, 0) for s in DELIVERED)

    def skipped(self, ledger: ShardLedger) -> int:
        """Rows committed before this run that it did not render again: those of complete shards, and those it
        read again and found delivered (open parts, changed shards; a complete shard read again is counted once)."""
        again = ledger.skipped_by_shard
        return (sum(max(self.delivered_in(shard), again.get(shard, 0)) for shard in self.records)
                + sum(n for shard, n in again.items() if shard not in self.records))



@dataclass(frozen=True)
class RunState:
    """One run in flight on the driver, handed on as one object: its plan, its corpus, the output (manifest
    and lease) and what that output held when the run started."""

    plan: RunPlan
    corpus: Corpus
    manifest: Manifest
    state: OutputState
    lease: Lease
    started: float  # time.time() at the run's start: its wall time in the summary
