"""The manifest: the one owner of an output's committed rows. It lists, reads, commits and compacts them.

Last stage of the flow, and what every job that reads an output goes through. Layout (version 2):

    manifest/shards/<file>/<n>.parquet         a complete shard: all its rows; statistics and the corpus range it
                                               covers in the Parquet footer. One object per shard.
    manifest/open/<file>/<n>/<hash>.parquet    rows committed while shard n is in progress (each part commits
                                               its rows; named by the rows it holds, so a retry rewrites it)
    manifest/open/<file>/<n>/<hash>.tar        with --image-output shards: the images of that part
    images/<xx>/<key>_<seed>.<ext>             --image-output files: one object per image
    images/<file>/<n>-<i>.tar                  --image-output shards: WebDataset tars of complete shards

A shard is a fixed range of `shard_size` rows of one corpus file. While it is in progress its rows are committed
in small content-named parts (exactly-once by idempotence: images first, the part last). Once every corpus row of
the shard is accounted for, `compact` merges its parts into the one shard object (and packs its images into
tars) and deletes the parts. A complete shard's object is authoritative: parts left beside it (a kill during
compaction) hold nothing it lacks and are tidied on the next run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.rows import DELIVERED, FAILED, OK, QUARANTINED, SKIPPED, STATUSES, row_key  # noqa: F401  (the rows' schema)
from orchestrator.output import images as image_layout
from orchestrator.output.lease import LEASE_FILE
from orchestrator.output.storage import LOCK_SUFFIX, PROBE_PREFIX, Output
from orchestrator.output.summary import shard_stats
from orchestrator.run.config import ConfigError

logger = logging.getLogger("seedsift")

LAYOUT_VERSION = 2
RUN_FILE = "run.json"
ID_SCOPE = "per file"  # run.json's layout["ids"] for outputs begun by this version (see Manifest.begin_run)
SHARDS_FOLDER = "manifest/shards"
OPEN_FOLDER = "manifest/open"
FOOTER_KEY = b"seedsift.shard"
FOOTER_TAIL = 256 * 1024  # bytes read from the end of a shard object: its footer with statistics fits


MANIFEST_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("source", pa.string()),  # corpus file (relative to the corpus root) and line, or parquet row
        ("seed", pa.int64()),
        ("candidate_index", pa.int32()),
        ("rank", pa.int32()),
        ("planned", pa.int32()),  # rows the policy planned for this prompt (k, or the budget's choice)
        ("predicted_score", pa.float64()),
        ("prompt_predicted_mean", pa.float64()),  # over all N candidates: how good this prompt's seeds look
        ("prompt_predicted_std", pa.float64()),  # their spread: how much choosing a seed can gain
        ("score", pa.float64()),
        ("image_key", pa.string()),  # relative to the output root; see orchestrator/output/images.py
        ("image_member", pa.string()),  # inside a tar (--image-output shards), else null
        ("image_offset", pa.int64()),
        ("image_size", pa.int64()),
        ("model", pa.string()),
        ("scheduler", pa.string()),
        ("attention", pa.string()),  # the denoiser's self-attention (an AttentionPlan label); null before 0.3: full
        ("steps", pa.int32()),
        ("steps_spent", pa.int32()),  # denoising steps this image cost: steps, plus its share of previews
        ("preview_candidates", pa.list_(pa.int32())),  # preview policy: the candidates previewed, best predicted first
        ("preview_scores", pa.list_(pa.float64())),  # and their previews' rated scores (the kept one is the highest)
        ("preview_steps", pa.int32()),  # steps each preview ran
        ("guidance", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("policy", pa.string()),
        ("rater", pa.string()),
        ("run_id", pa.string()),
        ("truncated", pa.bool_()),
        ("status", pa.string()),
        ("error", pa.string()),
        # Bookkeeping: which shard row this is, and digests of its prompt id and text for duplicate detection.
        ("shard", pa.string()),
        ("shard_row", pa.int32()),
        ("prompt_key", pa.uint64()),
        ("text_key", pa.uint64()),
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)


# --- identity ------------------------------------------------------------------------------------------------


def row_keys(table: pa.Table) -> list[tuple[str, str]]:
    return [row_key(p, s, src) for p, s, src in
            zip(table["prompt_id"].to_pylist(), table["seed"].to_pylist(), table["source"].to_pylist())]


def shard_id(file_key: str, index: int) -> str:
    return f"{file_key}/{index:06d}"


def split_shard_id(shard: str) -> tuple[str, int]:
    file_key, _, index = shard.rpartition("/")
    return file_key, int(index)


def complete_key(shard: str) -> str:
    return f"{SHARDS_FOLDER}/{shard}.parquet"


def part_key(shard: str, keys: list[tuple[str, str]], suffix: str = "parquet") -> str:
    """A part's key, named by the row keys it commits: a retried unit rewrites the same object."""
    digest = hashlib.blake2b(digest_size=12)
    for prompt_id, seed in sorted(keys):
        digest.update(f"{prompt_id}\x1f{seed}\x1e".encode("utf-8"))
    return f"{OPEN_FOLDER}/{shard}/{digest.hexdigest()}.{suffix}"


def tar_key(shard: str, index: int) -> str:
    file_key, number = split_shard_id(shard)
    return f"images/{file_key}/{number:06d}-{index:03d}.tar"


# --- shard records ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardFrame:
    """The corpus range a shard covers, as the reader found it: enough to skip it unread on the next run.

    `start`/`end` are byte offsets in the (decompressed) text file, or row numbers of a Parquet file; `digest`
    is a hash of those bytes (text) or of the file's identity (Parquet), checked before a shard is skipped.
    """

    file: str  # path relative to the corpus root
    index: int
    rows: int  # corpus rows in the shard (quarantined ones included)
    start: int
    end: int
    first_line: int  # number of the first line (text) or row (parquet) in the shard, as sources count it
    end_line: int  # number of the last line or row read, so a grown shard continues the count
    digest: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShardFrame:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ShardRecord:
    """A complete shard: where it came from in the corpus, and its statistics (the summary folds these)."""

    shard: str
    frame: ShardFrame
    stats: dict = field(default_factory=dict)
    tars: int = 0  # WebDataset tars written for it so far (--image-output shards)

    def to_json(self) -> str:
        return json.dumps({"layout": LAYOUT_VERSION, "shard": self.shard, "frame": asdict(self.frame),
                           "stats": self.stats, "tars": self.tars}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardRecord:
        values = json.loads(text)
        return cls(shard=values["shard"], frame=ShardFrame(**values["frame"]), stats=values.get("stats") or {},
                   tars=int(values.get("tars") or 0))


class DamagedManifest(ValueError):
    """A manifest object that cannot be read: the message names it."""


def _record_from_footer(key: str, tail: bytes) -> ShardRecord:
    """The ShardRecord in a shard object's footer, from the object's last bytes (no need for the whole file)."""
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise DamagedManifest(f"{key}: not a Parquet file (truncated or overwritten)")
    length = struct.unpack("<I", tail[-8:-4])[0]
    if length + 8 > len(tail):
        raise DamagedManifest(f"{key}: its footer ({length} bytes) is larger than expected")
    metadata = pq.read_metadata(io.BytesIO(b"PAR1" + tail[-8 - length:])).metadata or {}
    if FOOTER_KEY not in metadata:
        raise DamagedManifest(f"{key}: a Parquet file without seedsift's shard record")
    return ShardRecord.from_json(metadata[FOOTER_KEY])


# --- the manifest ------------------------------------------------------------------------------------------------


class Manifest:
    """An output's committed rows. Picklable (it holds only the Output), so Ray workers commit through it too."""

    def __init__(self, output: Output):
        self.output = output

    def __repr__(self) -> str:
        return f"Manifest({self.output.uri!r})"

    # layout -------------------------------------------------------------------------------------------------

    def read_run(self) -> dict | None:
        """run.json, or None for an empty output."""
        try:
            return self.output.read_json_if_there(RUN_FILE)
        except ValueError as exc:
            raise DamagedManifest(f"{self.output.uri_of(RUN_FILE)} is not valid JSON ({exc})") from exc

    def holds_a_run(self) -> bool:
        """Whether a seedsift run wrote here: a run.json with a seedsift fingerprint, or manifest objects beside an
        unreadable run.json or none (a damaged output, or one of seedsift 0.1, which verify and repair still read).
        A path that does not exist, or a bucket that does not, holds none."""
        try:
            if self.output.exists(RUN_FILE):
                try:
                    run = self.output.read_json(RUN_FILE)
                except ValueError:
                    return bool(self.output.list_keys("manifest", ".parquet"))
                return isinstance(run, dict) and "fingerprint" in run
            return bool(self.output.list_keys("manifest", ".parquet"))
        except FileNotFoundError:
            return False

    def require_run(self) -> None:
        """ConfigError unless a seedsift run wrote here: what every job that reads an output checks first."""
        if not self.holds_a_run():
            from orchestrator.run.config import ConfigError

            raise ConfigError(f"{self.output.uri} holds no seedsift run; is it the --out of a generate or collect "
                              "run?")

    def check_may_write(self, names: list[str]) -> None:
        """ConfigError unless the output is new, empty or seedsift's own: a run never replaces a file it did not
        write. `names`: the output's top-level listing (Output.top_level), taken by the caller before this call.
        A killed run's lease, taken before its run.json was written, counts as seedsift's."""
        # Another run starting into the same output at the same moment may have taken the lease (and its lock) and
        # be probing the store, its run.json not written yet: those names are seedsift's, never a user's. The
        # listing comes first and the run check after it, so a run.json that appears in between is read, not
        # mistaken for a user's file.
        own = {LEASE_FILE, LEASE_FILE + LOCK_SUFFIX}
        foreign = [name for name in names if name not in own and not name.startswith(PROBE_PREFIX)]
        if foreign and not self.holds_a_run():
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(f"--out {self.output.uri} holds files seedsift did not write ({shown}); seedsift writes "
                              "only into an empty folder, a new one, or its own output: choose another --out")

    def begin_run(self, run: dict, collection: bool) -> bool:
        """Refuse to mix two run configurations or two layouts in one output; write run.json for a new output.
        Called by the run holding the output's lease; `run` is what run.json records of it (RunPlan.run_file).

        Returns whether the corpus's ids are qualified by their file: an output begun by this version does so for a
        folder or glob corpus (`collection`; layout `ids: per file`); one begun by seedsift 0.2 keeps ids unique
        across the corpus, as it was written (its committed rows must keep matching what the corpus reads as)."""
        output = self.output
        previous, legacy = self.read_run(), self.legacy_parts()
        layout = {"version": LAYOUT_VERSION, **run["layout"], "ids": ID_SCOPE}
        if previous is None:
            if legacy:
                raise ConfigError(f"{output.uri} holds manifest parts but no {RUN_FILE}; it is not a seedsift output "
                                  "this version can continue. Write to a new --out")
            output.write_json(RUN_FILE, {**run, "layout": layout,
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            return collection
        recorded = previous.get("layout")
        if recorded is None or legacy:
            raise ConfigError(
                f"{output.uri} was written by seedsift 0.1, which committed one manifest part per 16 rows; this "
                "version keeps a sharded manifest and cannot continue it. Write to a new --out (the old output stays "
                "readable: seedsift verify, reproduce and manifest read it)")
        if recorded.get("version") != LAYOUT_VERSION:
            raise ConfigError(f"{output.uri} has manifest layout {recorded.get('version')}; this seedsift writes "
                              f"layout {LAYOUT_VERSION}. Use the seedsift that wrote it, or a new --out")
        scope = recorded.get("ids", "per corpus")  # 0.2's outputs record none: ids unique across the corpus
        changed = {k: (recorded.get(k), v) for k, v in layout.items() if k != "ids" and recorded.get(k) != v}
        if changed:
            raise ConfigError(f"{output.uri} is laid out with "
                              + ", ".join(f"{k}={a!r}" for k, (a, _) in changed.items())
                              + "; this run asks for " + ", ".join(f"{k}={b!r}" for k, (_, b) in changed.items())
                              + ". An output keeps its layout: rerun with the earlier values, or write to a new --out")
        if previous.get("fingerprint") != run["fingerprint"]:
            old, new = previous.get("fingerprint_fields", {}), run["fingerprint_fields"]
            changed = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])
            raise ConfigError(
                f"{output.uri} holds a run with another configuration ({changed}); resuming would mix images "
                "from two configurations. Write to a new --out, or rerun with the earlier settings."
            )
        if collection and scope != ID_SCOPE:
            logger.warning("%s was begun by seedsift 0.2: the ids of its corpus stay unique across all its files (a "
                           "repeated id is a duplicate); a new --out scopes them per file", output.uri)
        return collection and scope == ID_SCOPE

    def legacy_parts(self) -> list[str]:
        """Parts of a version-1 output (seedsift 0.1 wrote `manifest/part-<hash>.parquet`, one per 16 rows): one
        listing of the manifest folder's own names, not of the shards below it (10,000 of them at 10M rows)."""
        return [f"manifest/{name}" for name in self.output.names_in("manifest") if name.endswith(".parquet")]

    # listing ------------------------------------------------------------------------------------------------

    def complete_sizes(self) -> dict[str, int]:
        """{shard: object size} of every complete shard: one listing (a page per thousand shards on S3)."""
        prefix = len(SHARDS_FOLDER) + 1
        return {key[prefix:-len(".parquet")]: size
                for key, size in self.output.list_sizes(SHARDS_FOLDER, ".parquet").items()}

    def complete_records(self, sizes: dict[str, int] | None = None) -> dict[str, ShardRecord]:
        """The record of every complete shard, read from the footers concurrently (one ranged GET each)."""
        sizes = self.complete_sizes() if sizes is None else sizes
        shards = sorted(sizes)

        def read(shard: str) -> ShardRecord:
            key = complete_key(shard)
            return _record_from_footer(key, self.output.read_tail_of(key, sizes[shard], FOOTER_TAIL))

        return dict(zip(shards, self.output.read_many(shards, read)))

    def complete_record(self, shard: str) -> ShardRecord | None:
        """One complete shard's record, or None when the shard is not complete."""
        key = complete_key(shard)
        try:
            size = self.output.size(key)
        except FileNotFoundError:
            return None
        return _record_from_footer(key, self.output.read_tail_of(key, size, FOOTER_TAIL))

    def open_parts(self) -> dict[str, list[str]]:
        """{shard: its committed parts' keys} for every shard with open parts (in progress, or left over)."""
        parts: dict[str, list[str]] = {}
        for key in self.output.list_keys(OPEN_FOLDER, ".parquet"):
            shard = key[len(OPEN_FOLDER) + 1:].rpartition("/")[0]
            parts.setdefault(shard, []).append(key)
        return parts

    def object_count(self) -> int:
        """Manifest objects (complete shards, open parts and their tars)."""
        return len(self.output.list_keys("manifest"))

    # reading ------------------------------------------------------------------------------------------------

    def read_part(self, key: str, columns: list[str] | None = None) -> tuple[pa.Table, ShardFrame | None]:
        """One committed part and the shard frame its writer recorded."""
        data = self.output.read_bytes(key)
        try:
            parquet = pq.ParquetFile(io.BytesIO(data))
            table = _read_columns(parquet, columns)
        except pa.ArrowException as exc:
            raise DamagedManifest(f"{self.output.uri_of(key)}: cannot be read as Parquet ({exc})") from exc
        frame = (parquet.schema_arrow.metadata or {}).get(FOOTER_KEY)
        return table, ShardFrame.from_json(frame) if frame else None

    def read_complete(self, shard: str, columns: list[str] | None = None) -> pa.Table:
        key = complete_key(shard)
        data = self.output.read_bytes(key)
        try:
            return _read_columns(pq.ParquetFile(io.BytesIO(data)), columns)
        except pa.ArrowException as exc:
            raise DamagedManifest(f"{self.output.uri_of(key)}: cannot be read as Parquet ({exc})") from exc

    def read_shard(self, shard: str, columns: list[str] | None = None, complete: bool | None = None,
                   parts: list[str] | None = None) -> pa.Table | None:
        """Every committed row of one shard, each once: the complete object (if any) with its open parts merged in.

        `complete` and `parts`, when the caller listed them already, save a request each.
        """
        wanted = None if columns is None else list(dict.fromkeys([*columns, "prompt_id", "seed", "source", "status"]))
        complete = self.output.exists(complete_key(shard)) if complete is None else complete
        tables = [self.read_complete(shard, wanted)] if complete else []
        if parts is None:
            parts = self.output.list_keys(f"{OPEN_FOLDER}/{shard}", ".parquet")
        tables += [table for table, _ in self.output.read_many(parts, lambda key: self.read_part(key, wanted))]
        if not tables:
            return None
        merged = unique_rows(concat(tables))
        return merged.select(columns) if columns else merged

    def shard_columns(self, shard: str, columns: list[str], complete: bool, parts: list[str]) -> pa.Table | None:
        """Some columns of every object of a shard, not de-duplicated: for readers that need no row identity
        (the duplicate index takes digests, where a repeat is harmless)."""
        tables = [self.read_complete(shard, columns)] if complete else []
        tables += [table for table, _ in self.output.read_many(parts, lambda key: self.read_part(key, columns))]
        return concat(tables) if tables else None

    def delivered_keys(self, shard: str) -> set[tuple[str, str]]:
        """Row keys of a shard's delivered rows: what a resumed run must not render again."""
        table = self.read_shard(shard, ["prompt_id", "seed", "source", "status"])
        if table is None:
            return set()
        delivered = table.filter(pc.is_in(table["status"], pa.array(DELIVERED)))
        return set(row_keys(delivered))

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Every committed row of the output exactly once, shard by shard, in any state of the output (mid-run,
        after a kill, after compaction); memory holds one shard at a time."""
        legacy = self.legacy_parts()
        if legacy:
            yield from self._iter_legacy(legacy, columns)
            return
        complete = set(self.complete_sizes())
        parts = self.open_parts()
        for shard in sorted(complete | set(parts)):
            table = self.read_shard(shard, columns, complete=shard in complete,
                                    parts=[] if shard in complete and not parts.get(shard) else parts.get(shard, []))
            if table is not None and table.num_rows:
                yield table

    def read_all(self, columns: list[str] | None = None) -> pa.Table:
        tables = list(self.iter_tables(columns))
        if not tables:
            schema = MANIFEST_SCHEMA if columns is None else pa.schema([MANIFEST_SCHEMA.field(c) for c in columns])
            return schema.empty_table()
        return concat(tables)

    def find_row(self, prompt_id: str, seed: int) -> dict | None:
        """The committed row of (prompt_id, seed), delivered rather than failed; a scan of the prompt_id column."""
        for table in self.iter_tables(["prompt_id", "seed", "status", "shard"]):
            match = table.filter(pc.and_(pc.equal(table["prompt_id"], prompt_id), pc.equal(table["seed"], seed)))
            if match.num_rows:
                shard = match["shard"][0].as_py()
                rows = self.read_shard(shard) if shard else self.read_all()
                rows = rows.filter(pc.and_(pc.equal(rows["prompt_id"], prompt_id), pc.equal(rows["seed"], seed)))
                return rows.slice(0, 1).to_pylist()[0]
        return None

    def image_uri(self, row: dict) -> str | None:
        """Where a row's image is, as a URI under this output (a tar's URI for a row inside a WebDataset tar)."""
        return self.output.uri_of(row["image_key"]) if row.get("image_key") else None

    def read_image(self, row: dict) -> bytes:
        """The encoded image of a row, whichever layout holds it (one ranged read inside a tar)."""
        if row.get("image_member"):
            return self.output.read_range(row["image_key"], int(row["image_offset"]), int(row["image_size"]))
        return self.output.read_bytes(row["image_key"])

    def _iter_legacy(self, parts: list[str], columns: list[str] | None) -> Iterator[pa.Table]:
        """Version-1 parts, read as version-2 rows: image_key derived from the image_uri they stored."""
        for chunk in range(0, len(parts), 256):
            tables = self.output.read_many(parts[chunk:chunk + 256], self.output.read_table)
            table = concat([legacy_to_current(t) for t in tables])
            yield table.select(columns) if columns else table

    # committing ---------------------------------------------------------------------------------------------

    def commit_part(self, shard: str, rows: pa.Table, frame: ShardFrame) -> str:
        """Commit rows of one shard: one Parquet object named by its row keys, the frame in its footer.

        The caller has written the rows' images already; this object is their commit marker.
        """
        key = part_key(shard, row_keys(rows))
        metadata = {FOOTER_KEY: frame.to_json().encode("utf-8")}
        self.output.write_table(key, rows.replace_schema_metadata(metadata))
        return key

    def compact(self, shard: str, frame: ShardFrame | None = None, image_format: str = "png",
                shard_images: int = 1000) -> ShardRecord | None:
        """Make shard one object: merge its complete object (if any) and its parts, pack the parts' images into
        tars (--image-output shards), write the shard object with its record, then delete the parts.

        Idempotent and safe to kill at any point: every object it writes is a deterministic function of the
        committed rows, written before anything is deleted, and the shard object is written last of all.
        `frame` is the reader's view of the shard in this run; without it (tidying leftovers) the parts' or the
        existing record's frame is kept. Returns the new record, or None when the shard has nothing committed.
        """
        existing = self.complete_record(shard)
        parts = self.output.list_keys(f"{OPEN_FOLDER}/{shard}", ".parquet")
        tars = self.output.list_keys(f"{OPEN_FOLDER}/{shard}", ".tar")
        tables = [self.read_complete(shard)] if existing else []
        frames = [existing.frame] if existing else []
        for table, part_frame in self.output.read_many(parts, self.read_part):
            tables.append(table)
            if part_frame:
                frames.append(part_frame)
        if not tables:
            return None
        # The reader re-read a complete shard whose bytes changed since (edited, shrunk, or a tail that grew).
        reread = frame is not None and existing is not None and frame.digest != existing.frame.digest
        frame = frame or max(frames, key=lambda f: (f.rows, f.end))
        outdated = set(existing.stats.get("outdated_sources", [])) if existing else set()
        if reread:
            outdated |= outdated_sources(tables[0], concat(tables[1:]) if len(tables) > 1 else None, frame.rows)
        rows = sort_shard(unique_rows(concat(tables)))
        tar_count = existing.tars if existing else 0
        if tars:  # images of rows committed while the shard was open: pack them into the shard's tars
            rows, tar_count = self._pack_tars(shard, rows, tar_count, image_format, shard_images)
        stats = shard_stats(rows)
        if outdated:
            stats["outdated_sources"] = sorted(outdated)
        record = ShardRecord(shard=shard, frame=frame, stats=stats, tars=tar_count)
        self.output.write_table(complete_key(shard), rows.replace_schema_metadata(
            {FOOTER_KEY: record.to_json().encode("utf-8")}))
        self.output.delete(parts + tars)
        self.output.remove_empty_folder(f"{OPEN_FOLDER}/{shard}")
        return record

    def _pack_tars(self, shard: str, rows: pa.Table, first_tar: int, image_format: str,
                   shard_images: int) -> tuple[pa.Table, int]:
        """Copy the images of rows that still point into open parts' tars into new WebDataset tars of the shard.

        Tars already written for the shard stay as they are (rows of the complete object keep pointing into
        them); new images go to new tars numbered after them, so no referenced object is ever rewritten.
        """
        extension = image_layout.EXTENSIONS[image_format]
        open_prefix = f"{OPEN_FOLDER}/{shard}/"
        image_keys = rows["image_key"].to_pylist()
        moving = [i for i, key in enumerate(image_keys) if key and key.startswith(open_prefix)]
        if not moving:
            return rows, first_tar
        sources = {key: self.output.read_bytes(key) for key in sorted({image_keys[i] for i in moving})}
        members, offsets = rows["image_member"].to_pylist(), rows["image_offset"].to_pylist()
        sizes = rows["image_size"].to_pylist()
        listed = rows.to_pylist()
        tar_index = first_tar
        for start in range(0, len(moving), shard_images):
            key = tar_key(shard, tar_index)
            with self.output.open_write(key) as stream:
                packer = image_layout.TarPacker(stream)
                for i in moving[start:start + shard_images]:
                    data = sources[image_keys[i]][offsets[i]:offsets[i] + sizes[i]]
                    sample = image_layout.sample_key(listed[i]["prompt_id"], listed[i]["seed"])
                    files = image_layout.sample_files(sample, extension, data, listed[i])
                    placed = [packer.add(name, content) for name, content in files]
                    image_keys[i], members[i] = key, placed[0].name
                    offsets[i], sizes[i] = placed[0].offset, placed[0].size
                packer.close()
            tar_index += 1
        for name, values in (("image_key", image_keys), ("image_member", members), ("image_offset", offsets),
                             ("image_size", sizes)):
            rows = rows.set_column(rows.schema.get_field_index(name), name,
                                   pa.array(values, MANIFEST_SCHEMA.field(name).type))
        return rows, tar_index


# --- tables ----------------------------------------------------------------------------------------------------


def _read_columns(parquet: pq.ParquetFile, columns: list[str] | None) -> pa.Table:
    """The asked columns of a manifest object; a column the object predates (written before it existed, such as
    `attention`) reads as nulls of its manifest type, so readers ask for today's columns from any object."""
    if columns is None:
        return parquet.read()
    present = set(parquet.schema_arrow.names)
    table = parquet.read(columns=[c for c in columns if c in present])
    for name in columns:
        if name not in present:
            field = MANIFEST_SCHEMA.field(name) if name in MANIFEST_COLUMNS else pa.field(name, pa.null())
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(columns)


def manifest_table(rows: list[dict]) -> pa.Table:
    """Rows as a manifest table; missing columns become nulls, extra keys are refused."""
    extra = set().union(*(row.keys() for row in rows)) - set(MANIFEST_COLUMNS) if rows else set()
    if extra:
        raise ValueError(f"manifest rows have unknown columns: {', '.join(sorted(extra))}")
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def concat(tables: list[pa.Table]) -> pa.Table:
    tables = [t.replace_schema_metadata(None) for t in tables]
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def unique_rows(table: pa.Table) -> pa.Table:
    """One row per row key: a delivered row wins over failed attempts of the same key, then the first one."""
    best: dict[tuple[str, str], int] = {}
    statuses = table["status"].to_pylist()
    for i, key in enumerate(row_keys(table)):
        kept = best.get(key)
        if kept is None or (statuses[kept] not in DELIVERED and statuses[i] in DELIVERED):
            best[key] = i
    if len(best) == table.num_rows:
        return table
    return table.take(pa.array(sorted(best.values()), pa.int64()))


def outdated_sources(earlier: pa.Table, now: pa.Table | None, rows_now: int) -> set[str]:
    """Sources of a re-read shard's earlier delivered rows whose corpus line has since changed or gone.

    A position the reader delivered nothing new for, inside the shard's rows now, is unchanged. Any other earlier
    row (its position is past the shard's end now, or new rows were committed for it) is outdated unless its prompt
    id and text are among the shard's new rows: a line that only moved (an insertion or deletion above it) comes
    back as a quarantined duplicate of itself and is not named. One that moved across a shard boundary is named in
    its old shard: an over-count, never a miss. The output is append-only (those images were paid for and may be
    in use), so the rows stay; the shard record lists them, and the summary and console say so."""
    columns = ("shard_row", "prompt_id", "prompt")
    new_rows = list(zip(*(now[c].to_pylist() for c in columns))) if now is not None else []
    changed = {position for position, _, _ in new_rows}
    present = {(prompt_id, prompt) for _, prompt_id, prompt in new_rows}
    found = set()
    for position, prompt_id, prompt, status, source in zip(*(earlier[c].to_pylist() for c in (
            *columns, "status", "source"))):
        if status in DELIVERED and (position >= rows_now or position in changed) \
                and (prompt_id, prompt) not in present:
            found.add(source)
    return found


def sort_shard(table: pa.Table) -> pa.Table:
    """Rows of a shard in corpus order, best-ranked first: the order a complete shard object keeps."""
    return table.sort_by([("shard_row", "ascending"), ("rank", "ascending"), ("candidate_index", "ascending"),
                          ("source", "ascending")])


def legacy_to_current(table: pa.Table) -> pa.Table:
    """A version-1 part as version-2 rows (its images stay where they are; keys from the stored URIs)."""
    rows = table.to_pylist()
    for row in rows:
        uri = row.pop("image_uri", None)
        if uri and "/images/" in uri:
            row["image_key"] = "images/" + uri.split("/images/", 1)[1]
        for name in list(row):
            if name not in MANIFEST_COLUMNS:
                row.pop(name)
    return manifest_table(rows)
