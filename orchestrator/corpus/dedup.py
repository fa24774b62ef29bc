"""Duplicate prompts and duplicate ids: the first occurrence is rendered, later ones become quarantined rows.

Sits right after corpus reading, before the scorer. Why it matters for exactly-once: two corpus rows with the
same id derive the same seeds, so without this stage they would render the same (prompt_id, seed) twice.

Sharded and indexed, so that no process holds the corpus:
- **DuplicateIndex** buckets hold 64-bit digests of prompt ids and texts, each bucket the keys whose digest falls
  in it, as sorted numpy arrays (16 bytes a key: the digest and its owner). At start each loads its keys from the
  output: the `prompt_key`/`text_key` columns of complete shards and open parts. With several buckets (outputs of
  more than KEYS_PER_BUCKET keys) each is an actor of its own; with one (every output below that: most jobs) a Ray
  task loads it and the filter holds it, so a run starts one process fewer (2.5-3 CPU-seconds and 1.3 s of a warm
  run on 2 cores, measured: the renderer's start no longer shares the cores with it; benchmarks/README.md).
- **DuplicateFilter**, one Ray Data actor, sees the corpus rows in reading order. For each block it looks up
  every key in its bucket, decides row by row (first occurrence wins, earlier rows of the block included), and
  then registers the keys of the rows it let through. It is the only writer, so lookups and inserts never race.

An owner names the corpus row that holds a key first, packed in 64 bits: the file's number (16 bits, from the
list of file keys the driver hands to every actor of the run), the shard's index in the file (24 bits) and the
row in the shard (24 bits). So the index never stores strings, and the filter itself keeps no state that a
restart would lose; the source named in "duplicate of <source>" is looked up only for the duplicates found.

Determinism. Within a file, "first" is file order: one read task streams a file in order to the one filter.
Files of a multi-file corpus are read in parallel, so which of two cross-file copies arrives first depends on
timing; a copy rendered by an earlier run is always the first occurrence, whatever arrives first now. A row
re-read by a resumed run has its own owner, so it is never a duplicate of itself.

Failure: the index lives in memory, so whatever holds it runs with max_restarts=0: if it dies the job fails (and
a rerun resumes from the committed rows) rather than restarting with only what the output held at start and
letting a duplicate through. That is the index actors, or, with one bucket, the filter; a filter in front of
index actors holds nothing that matters, so Ray Data may restart it like any pool actor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.stages.light import give_way_to_generators
from orchestrator.corpus.reader import READ_CPUS
from orchestrator.output.manifest import QUARANTINED, Manifest, shard_id, split_shard_id

KEYS_PER_BUCKET = 8_000_000  # about 130 MB of keys and owners per index actor
MERGE_EVERY = 262_144  # keys inserted since the last merge into the sorted arrays


class Owners:
    """Packs (shard, shard row) into one 64-bit owner and back; the same file list in every actor of a run."""

    def __init__(self, file_keys: list[str]):
        self.files = list(dict.fromkeys(file_keys))
        self.codes = {key: code for code, key in enumerate(self.files, start=1)}

    def of(self, shard: str, rows: np.ndarray) -> np.ndarray:
        key, index = split_shard_id(shard)
        head = (self.codes[key] << 48) | (index << 24)
        return np.uint64(head) | np.asarray(rows).astype(np.uint64)

    def shard_of(self, owner: int) -> tuple[str | None, int]:
        code, index, row = owner >> 48, (owner >> 24) & 0xFFFFFF, owner & 0xFFFFFF
        if not 1 <= code <= len(self.files):
            return None, row
        return shard_id(self.files[code - 1], index), row


def bucket_count(expected_keys: int) -> int:
    return int(min(64, max(1, -(-expected_keys // KEYS_PER_BUCKET))))


class DuplicateIndex:
    """One bucket of the duplicate index: sorted digests and their owners, plus a small unsorted recent part."""

    def __init__(self, bucket: int, buckets: int):
        self.bucket, self.buckets = bucket, buckets
        self.keys = np.empty(0, np.uint64)
        self.owners = np.empty(0, np.uint64)
        self.recent: dict[int, int] = {}

    def load(self, manifest: Manifest, owners: Owners, complete: list[str], open_parts: dict) -> int:
        """Take this bucket's keys from the committed rows; returns how many. Reads a few columns per shard."""
        columns = ["prompt_key", "text_key", "shard_row", "status"]

        def read(shard: str) -> tuple[np.ndarray, np.ndarray]:
            table = manifest.shard_columns(shard, columns, shard in complete_set, open_parts.get(shard, []))
            if table is None or not table.num_rows:
                return np.empty(0, np.uint64), np.empty(0, np.uint64)
            table = table.filter(pc.not_equal(table["status"], QUARANTINED))
            rows = table["shard_row"].to_numpy(zero_copy_only=False)
            owner = owners.of(shard, rows)
            keys = np.concatenate([table["prompt_key"].to_numpy(zero_copy_only=False),
                                   table["text_key"].to_numpy(zero_copy_only=False)]).astype(np.uint64)
            both = np.concatenate([owner, owner])
            mine = (keys != 0) & (keys % np.uint64(self.buckets) == np.uint64(self.bucket))
            return keys[mine], both[mine]

        complete_set = set(complete)
        shards = sorted(complete_set | set(open_parts))
        pieces = manifest.output.read_many(shards, read)
        if pieces:
            keys = np.concatenate([self.keys] + [k for k, _ in pieces])
            holders = np.concatenate([self.owners] + [o for _, o in pieces])
            self.keys, first = np.unique(keys, return_index=True)
            self.owners = holders[first]
        give_way_to_generators()  # once loaded: the run waits for this load
        return int(len(self.keys))

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The owner of each key, 0 where the key is new."""
        keys = np.asarray(keys, dtype=np.uint64)
        found = np.zeros(len(keys), np.uint64)
        if len(self.keys):
            where = np.searchsorted(self.keys, keys)
            hit = where < len(self.keys)
            hit[hit] = self.keys[where[hit]] == keys[hit]
            found[hit] = self.owners[where[hit]]
        if self.recent:
            for i in np.flatnonzero(found == 0):
                found[i] = self.recent.get(int(keys[i]), 0)
        return found

    def insert(self, keys: np.ndarray, owners: np.ndarray) -> None:
        for key, owner in zip(np.asarray(keys, np.uint64).tolist(), np.asarray(owners, np.uint64).tolist()):
            self.recent.setdefault(key, owner)
        if len(self.recent) >= MERGE_EVERY:
            self._merge()

    def size(self) -> int:
        return int(len(self.keys) + len(self.recent))

    def _merge(self) -> None:
        recent_keys = np.fromiter(self.recent.keys(), np.uint64, len(self.recent))
        recent_owners = np.fromiter(self.recent.values(), np.uint64, len(self.recent))
        keys = np.concatenate([self.keys, recent_keys])
        owners = np.concatenate([self.owners, recent_owners])
        order = np.argsort(keys, kind="stable")
        self.keys, self.owners = keys[order], owners[order]
        self.recent = {}


class DuplicateFilter:
    """Ray Data callable class (one actor): quarantines every later occurrence of a prompt id or a prompt text."""

    def __init__(self, indexes: IndexActors, manifest: Manifest, owners: Owners):
        give_way_to_generators()
        indexes.wait_loaded()  # no lookup before every bucket holds the committed keys
        self.indexes = indexes.actors
        self.held = ray.get(indexes.held) if indexes.held_by_filter else None  # the one bucket, in this process
        self.manifest = manifest
        self.owners = owners
        self.sources: dict[str, dict[int, str]] = {}  # shard -> {shard row: source}, for messages only

    def __call__(self, batch: pa.Table) -> pa.Table:
        statuses = batch["status"].to_pylist()
        candidates = [i for i, status in enumerate(statuses) if status == "ok"]
        if not candidates:
            return batch
        shards = batch["shard"].to_pylist()
        rows = batch["shard_row"].to_numpy(zero_copy_only=False)
        owners = np.array([int(self.owners.of(shards[i], rows[i])) for i in candidates], np.uint64)
        id_keys = batch["prompt_key"].to_numpy(zero_copy_only=False)[candidates].astype(np.uint64)
        text_keys = batch["text_key"].to_numpy(zero_copy_only=False)[candidates].astype(np.uint64)
        known = self._lookup(np.concatenate([id_keys, text_keys]))
        known_id, known_text = known[: len(candidates)], known[len(candidates):]
        self._remember_sources(batch, shards)
        errors = batch["error"].to_pylist()
        seen: dict[int, int] = {}  # keys claimed earlier in this block
        claimed_keys, claimed_owners = [], []
        changed = False
        for j, i in enumerate(candidates):
            own = int(owners[j])
            earlier = None
            for key, stored in ((int(id_keys[j]), int(known_id[j])), (int(text_keys[j]), int(known_text[j]))):
                first = stored or seen.get(key, 0)
                if first and first != own:
                    earlier = first
                    break
            if earlier is not None:
                statuses[i], errors[i] = QUARANTINED, f"duplicate of {self._source_of(earlier)}"
                changed = True
                continue
            for key, stored in ((int(id_keys[j]), int(known_id[j])), (int(text_keys[j]), int(known_text[j]))):
                if not stored and key not in seen:
                    seen[key] = own
                    claimed_keys.append(key)
                    claimed_owners.append(own)
        self._insert(np.array(claimed_keys, np.uint64), np.array(claimed_owners, np.uint64))
        if not changed:
            return batch
        batch = batch.set_column(batch.schema.get_field_index("status"), "status", pa.array(statuses, pa.string()))
        return batch.set_column(batch.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))

    def _buckets(self, keys: np.ndarray) -> np.ndarray:
        return (keys % np.uint64(len(self.indexes))).astype(np.int64)

    def _lookup(self, keys: np.ndarray) -> np.ndarray:
        if self.held is not None:
            return self.held.lookup(keys)
        found = np.zeros(len(keys), np.uint64)
        buckets = self._buckets(keys)
        wanted = [(b, np.flatnonzero(buckets == b)) for b in range(len(self.indexes))]
        refs = [self.indexes[b].lookup.remote(keys[where]) for b, where in wanted if len(where)]
        for (b, where), result in zip([w for w in wanted if len(w[1])], ray.get(refs)):
            found[where] = result
        return found

    def _insert(self, keys: np.ndarray, owners: np.ndarray) -> None:
        if not len(keys):
            return
        if self.held is not None:
            self.held.insert(keys, owners)
            return
        buckets = self._buckets(keys)
        ray.get([self.indexes[b].insert.remote(keys[buckets == b], owners[buckets == b])
                 for b in range(len(self.indexes)) if (buckets == b).any()])

    def _remember_sources(self, batch: pa.Table, shards: list) -> None:
        for shard, row, source in zip(shards, batch["shard_row"].to_pylist(), batch["source"].to_pylist()):
            self.sources.setdefault(shard, {})[row] = source
        while len(self.sources) > 8:  # the recent shards only; older ones are read back when a message needs them
            self.sources.pop(next(iter(self.sources)))

    def _source_of(self, owner: int) -> str:
        shard, row = self.owners.shard_of(owner)
        if shard is None:
            return "an earlier row"
        if row not in self.sources.get(shard, {}):  # a shard of an earlier run: read its sources once
            table = self.manifest.read_shard(shard, ["shard_row", "source"])
            if table is not None:
                self.sources[shard] = dict(zip(table["shard_row"].to_pylist(), table["source"].to_pylist()))
        return self.sources.get(shard, {}).get(row, "an earlier row")


@dataclass(frozen=True)
class IndexActors:
    """The duplicate index of a run and its loads from the output: one actor per bucket (they live as long as the
    driver holds this), or, with one bucket, no actor and the filter holds the bucket its load task returns."""

    actors: list
    loads: list  # ObjectRefs, in flight until done: each load's key count
    held: ray.ObjectRef | None = None  # with one bucket: the bucket its load task made, for the filter to hold

    @property
    def held_by_filter(self) -> bool:
        return not self.actors

    def wait_loaded(self) -> list[int]:
        """Block until every bucket is loaded and return each load's key count; raise what a load raised (a damaged
        manifest object, the store). Only counts come back: the driver asks this on its error path, and a held
        bucket has every key the output has committed (up to KEYS_PER_BUCKET, about 130 MB)."""
        return ray.get(self.loads)


def _load_bucket(manifest: Manifest, owners: Owners, complete: list[str], open_parts: dict
                 ) -> tuple[int, DuplicateIndex]:
    index = DuplicateIndex(0, 1)
    return index.load(manifest, owners, complete, open_parts), index


def start_index(manifest: Manifest, owners: Owners, complete: list[str], open_parts: dict,
                buckets: int, num_cpus: float = READ_CPUS) -> IndexActors:
    """The index actors, loading from the output in the background: the run's other actors start meanwhile, and
    the filter waits for the loads before its first lookup. With one bucket, a task (a pooled worker, no new
    process) loads it for the filter to hold."""
    if buckets == 1:
        # Reading committed rows is idempotent. Two returns: the key count to wait on, the bucket for the filter.
        load = ray.remote(num_cpus=num_cpus, max_retries=3, num_returns=2)(_load_bucket)
        count, bucket = load.remote(manifest, owners, complete, open_parts)
        return IndexActors([], [count], bucket)
    actor = ray.remote(num_cpus=num_cpus, max_restarts=0)(DuplicateIndex)
    actors = [actor.remote(b, buckets) for b in range(buckets)]
    return IndexActors(actors, [index.load.remote(manifest, owners, complete, open_parts) for index in actors])


def drop_duplicates(ds, indexes: IndexActors, manifest: Manifest, owners: Owners, num_cpus: float = READ_CPUS):
    """The dedup stage on a corpus dataset: one filter actor, in front of the index actors or holding the one
    bucket; then it must not be restarted (module docstring)."""
    restarts = {"max_restarts": 0} if indexes.held_by_filter else {}
    return ds.map_batches(
        DuplicateFilter, fn_constructor_kwargs={"indexes": indexes, "manifest": manifest, "owners": owners},
        batch_format="pyarrow", batch_size=None, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=num_cpus,
        **restarts,
    )
