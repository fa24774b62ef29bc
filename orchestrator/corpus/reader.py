"""Corpus reading on Ray Data: each file is streamed by one read task and cut into shards of `shard_size` rows.

First stage of the flow. Every row carries its shard (file and number), its place in the shard and the shard's
frame (the byte or row range it covers, with a digest). A shard the manifest records as complete is skipped
without parsing: its bytes are hashed and compared with the record, so the cost of a rerun does not grow with
what the output already holds, and an edited shard is noticed and read again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from orchestrator.corpus.listing import (CORPUS_SCHEMA, DETECT, Columns, CorpusFile, check_corpus, corpus_record,
                                         delimited_header, id_digest, in_sample, is_collection, list_corpus,
                                         open_corpus_file, parquet_columns, parse_lines, parse_table,
                                         readable_on_the_driver, text_digest)
from orchestrator.output.images import safe_key
from orchestrator.output.manifest import ShardFrame, shard_id

logger = logging.getLogger("seedsift")
READ_CPUS = 0.25  # reading is I/O bound; a whole core would starve the model stages on small machines
HASH_CHUNK = 1 << 20

# The corpus schema plus the shard bookkeeping every later stage carries.
READ_SCHEMA = pa.schema(
    list(CORPUS_SCHEMA)
    + [
        ("shard", pa.string()),
        ("shard_row", pa.int32()),  # the row's place among the shard's rows (quarantined rows count)
        ("shard_rows", pa.int32()),  # rows the shard holds in this read
        ("shard_base", pa.int32()),  # its first rows, complete already and not read again (a shard that grew)
        ("shard_frame", pa.string()),  # the ShardFrame as JSON: what the shard object will record
        ("prompt_key", pa.uint64()),
        ("text_key", pa.uint64()),
    ]
)


def file_key(name: str) -> str:
    """The name a corpus file's shards go by in the manifest: safe for any store, unique per file name."""
    readable = name.replace("/", "__")
    return readable if safe_key(readable.replace(".", "_")) == readable.replace(".", "_") and not readable.startswith(".") \
        else safe_key(readable.replace(".", "_"))


@dataclass(frozen=True)
class ReadSettings:
    shard_size: int
    sample: float | None = None
    limit: int | None = None  # rows of this file to read at most (the driver splits --limit over the files)
    storage_options: dict | None = None
    columns: Columns = DETECT
    ids_per_file: bool = False  # a folder or glob corpus of an output laid out so: ids are qualified by their file


def _decompression_errors() -> tuple[type[BaseException], ...]:
    """What a codec raises on damaged or truncated data (EOFError: a stream that ends before its end marker)."""
    import gzip
    import lzma
    import zlib

    errors: list[type[BaseException]] = [EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


class _LineStream:
    """Raw lines of a binary stream with the byte position after each, and the bytes they came from.

    For a compressed file, damaged data ends the stream where it starts, and `damage` says what the codec found:
    the rows before it are read, the file is reported (a failed row), and the run goes on."""

    def __init__(self, raw, compressed: bool = False):
        self._raw = io.BufferedReader(raw) if not hasattr(raw, "peek") else raw
        self._pending = b""
        self.position = 0
        self.line = 0  # number of the last line read with readline (set by the caller after skipping bytes)
        self.hasher = None  # set by the framing loop: hashes every byte read while set
        self.damage: str | None = None
        self._errors = _decompression_errors() if compressed else ()

    def _raw_call(self, read, *args) -> bytes:
        if self.damage is not None:
            return b""
        try:
            return read(*args)
        except Exception as exc:  # noqa: BLE001 - codec errors only; anything else is raised as it was
            if isinstance(exc, self._errors) or (self._errors and isinstance(exc, OSError)
                                                 and "data stream" in str(exc)):  # bz2's damaged data
                self.damage = f"{type(exc).__name__}: {exc}"
                return b""
            raise

    def read_exact(self, size: int) -> bytes:
        chunks, remaining = [], size
        if self._pending:
            chunks.append(self._pending[:remaining])
            self._pending = self._pending[len(chunks[0]):]
            remaining -= len(chunks[0])
        while remaining > 0:
            chunk = self._raw_call(self._raw.read, min(HASH_CHUNK, remaining))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        self._advance(data)
        return data

    def unread(self, data: bytes) -> None:
        self._pending = data + self._pending
        self.position -= len(data)

    def readline(self) -> bytes:
        if self._pending:
            cut = self._pending.find(b"\n")
            if cut < 0:
                line, self._pending = self._pending + self._raw_call(self._raw.readline), b""
            else:
                line, self._pending = self._pending[:cut + 1], self._pending[cut + 1:]
        else:
            line = self._raw_call(self._raw.readline)
        if line:
            self.line += 1
        self._advance(line)
        return line

    def _advance(self, data: bytes) -> None:
        self.position += len(data)
        if self.hasher is not None:
            self.hasher.update(data)

    def lines(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line


DAMAGED_FILE = "compressed data damaged"


def damaged_file_row(corpus_file: CorpusFile, stream: _LineStream) -> dict:
    """The row a damaged compressed file ends with: failed (not delivered), so the file stays reported and its shard
    open until the file is replaced; the rows before the damage are delivered as usual."""
    row = corpus_record(None, None, f"{corpus_file.name}:{stream.line + 1}")
    return row | {"status": "failed", "error": f"{corpus_file.name}: {DAMAGED_FILE} after line {stream.line} "
                                               f"({stream.damage}); the rest of the file was not read"}


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _shard_table(rows: list[dict], shard: str, base: int, frame: ShardFrame) -> pa.Table:
    count = base + len(rows)
    frame_json = frame.to_json()
    for position, row in enumerate(rows, start=base):
        row.update(shard=shard, shard_row=position, shard_rows=count, shard_base=base, shard_frame=frame_json,
                   prompt_key=id_digest(row["prompt_id"]) if row["status"] == "ok" else 0,
                   text_key=text_digest(row["prompt"]) if row["status"] == "ok" else 0)
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


def read_text_shards(corpus_file: CorpusFile, complete: dict[int, ShardFrame], settings: ReadSettings
                     ) -> Iterator[pa.Table]:
    """The shards of one txt/jsonl/csv/tsv file that need work, one table each (complete ones skipped unread)."""
    key = file_key(corpus_file.name)
    budget = settings.limit
    with open_corpus_file(corpus_file, settings.storage_options) as raw:
        stream = _LineStream(raw, compressed=corpus_file.compression is not None)
        header = None
        if corpus_file.fmt in ("csv", "tsv"):
            first = stream.readline()
            if not first:
                return
            header = delimited_header(first, corpus_file.name, "," if corpus_file.fmt == "csv" else "\t",
                                      settings.columns)
        index = 0
        while budget is None or budget > 0:
            start, base, first_line = stream.position, 0, stream.line + 1
            hasher = hashlib.blake2b(digest_size=16)
            known = complete.get(index)
            if known is not None and known.start == start:
                data = stream.read_exact(known.end - known.start)
                if len(data) == known.end - known.start and _digest(data) == known.digest:
                    stream.line = known.end_line
                    if known.rows >= settings.shard_size:
                        index += 1
                        continue
                    hasher.update(data)  # a tail shard that was complete at the end of the file: it may grow
                    base, first_line = known.rows, known.first_line
                else:
                    logger.warning("%s changed in shard %d (bytes %d-%d) since it was rendered: reading it again; "
                                   "rows already delivered are not rendered twice", corpus_file.name, index,
                                   known.start, known.end)
                    stream.unread(data)
            stream.hasher = hasher
            rows = []
            wanted = settings.shard_size - base
            if budget is not None:
                wanted = min(wanted, budget)
            for record in parse_lines(stream.lines(), corpus_file.fmt, corpus_file.name, stream.line + 1, header,
                                      settings.columns, settings.ids_per_file):
                if settings.sample is not None and not in_sample(record["prompt_id"], settings.sample):
                    continue
                rows.append(record)
                if len(rows) >= wanted:
                    break
            stream.hasher = None
            if stream.damage is not None:  # the file ends at its damage: this is its last shard
                rows.append(damaged_file_row(corpus_file, stream))
            if not rows:
                return
            # The parser reads no further than the last line of the row it yields (or to the end of the file, whose
            # trailing blank lines then belong to the last shard), so the bytes hashed are exactly [start, end).
            frame = ShardFrame(file=corpus_file.name, index=index, rows=base + len(rows), start=start,
                               end=stream.position, first_line=first_line, end_line=stream.line,
                               digest=hasher.hexdigest())
            yield _shard_table(rows, shard_id(key, index), base, frame)
            if budget is not None:
                budget -= len(rows)
            if len(rows) < wanted or stream.damage is not None:
                return
            index += 1


def parquet_identity(corpus_file: CorpusFile, storage_options: dict | None) -> str:
    """What identifies a parquet corpus file's content: its size and modification time or ETag."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(corpus_file.uri, **(storage_options or {}))
    info = fs.info(path)
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return f"{info.get('size')}:{stamp}"


def read_parquet_shards(corpus_file: CorpusFile, complete: dict[int, ShardFrame], settings: ReadSettings
                        ) -> Iterator[pa.Table]:
    """The shards of one parquet file that need work; a file's shards are fixed row ranges of it."""
    key = file_key(corpus_file.name)
    identity = parquet_identity(corpus_file, settings.storage_options)
    budget = settings.limit
    with open_corpus_file(corpus_file, settings.storage_options) as handle:
        parquet = pq.ParquetFile(handle)
        prompt_col, id_col = parquet_columns(parquet.schema_arrow.names, corpus_file.name, settings.columns)
        columns = [prompt_col] + ([id_col] if id_col else [])
        total = parquet.metadata.num_rows
        group_starts, position = [], 0
        for group in range(parquet.num_row_groups):
            group_starts.append(position)
            position += parquet.metadata.row_group(group).num_rows
        index = 0
        while index * settings.shard_size < total and (budget is None or budget > 0):
            start = index * settings.shard_size
            end = min(total, start + settings.shard_size)
            digest = _digest(f"{identity}:{start}:{end}".encode())
            known = complete.get(index)
            if known is not None and known.digest == digest:
                index += 1
                continue
            groups = [g for g, first in enumerate(group_starts)
                      if first < end and first + parquet.metadata.row_group(g).num_rows > start]
            table = parquet.read_row_groups(groups, columns=columns)
            table = table.slice(start - group_starts[groups[0]], end - start)
            rows = [r for r in parse_table(table, corpus_file.name, start, settings.columns, settings.ids_per_file)
                    if settings.sample is None or in_sample(r["prompt_id"], settings.sample)]
            if budget is not None:
                rows = rows[:budget]
                budget -= len(rows)
            if rows:
                frame = ShardFrame(file=corpus_file.name, index=index, rows=len(rows), start=start, end=end,
                                   first_line=start, end_line=end - 1, digest=digest)
                yield _shard_table(rows, shard_id(key, index), 0, frame)
            index += 1


class CorpusDatasource(Datasource):
    """One read task per corpus file, each yielding the file's shards that need work."""

    def __init__(self, files: list[CorpusFile], complete: dict[str, dict[int, ShardFrame]], settings: ReadSettings,
                 limits: dict[str, int] | None = None):
        self.files = files
        self.complete = complete  # {file key: {shard index: frame}} of the shards the manifest holds complete
        self.settings = settings
        self.limits = limits or {}

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, **_) -> list[ReadTask]:
        tasks = []
        for corpus_file in self.files:
            if corpus_file.name in self.limits and self.limits[corpus_file.name] <= 0:
                continue
            settings = dataclasses.replace(self.settings, limit=self.limits.get(corpus_file.name))
            complete = self.complete.get(file_key(corpus_file.name), {})
            read = read_parquet_shards if corpus_file.fmt == "parquet" else read_text_shards
            metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=[corpus_file.uri], exec_stats=None)
            tasks.append(ReadTask(lambda f=corpus_file, c=complete, s=settings, r=read: r(f, c, s), metadata))
        return tasks


def read_corpus(files: list[CorpusFile], settings: ReadSettings, complete: dict | None = None,
                limits: dict[str, int] | None = None, num_cpus: float = READ_CPUS) -> ray.data.Dataset:
    """A Ray dataset of the corpus rows that need work; the driver only lists files, workers stream them."""
    source = CorpusDatasource(files, complete or {}, settings, limits)
    # One block stream per file, never split into smaller read tasks: a shard's rows stay together.
    return ray.data.read_datasource(source, override_num_blocks=max(1, len(files)), num_cpus=num_cpus)


def split_limit(files: list[CorpusFile], limit: int | None, storage_options: dict | None = None,
                columns: Columns = DETECT) -> dict[str, int] | None:
    """--limit N over a corpus of several files: the first N rows in file order, as a count per file.

    Counting parses the files before the one where the limit falls (a limit is for trials, so N is small).
    """
    if limit is None:
        return None
    limits, remaining = {}, limit
    for corpus_file in files:
        limits[corpus_file.name] = remaining
        if remaining > 0 and corpus_file is not files[-1]:
            settings = ReadSettings(shard_size=remaining, limit=remaining, storage_options=storage_options,
                                    columns=columns)
            read = read_parquet_shards if corpus_file.fmt == "parquet" else read_text_shards
            remaining -= sum(table.num_rows for table in read(corpus_file, {}, settings))
    return limits


@dataclass(frozen=True)
class Corpus:
    """A corpus as the driver knows it before Ray starts: its files, checked, and what the later steps ask of them
    (asked once here, so the run does not go back to the listing for each)."""

    files: list[CorpusFile]
    collection: bool  # --prompts names a folder or a glob: a new output qualifies ids by their file
    readable_on_driver: bool  # small enough for the driver to read up front (the nothing-to-render check)
    limits: dict[str, int] | None  # --limit split over the files, in file order; None without --limit


def open_corpus(uri: str, columns: Columns = DETECT, storage_options: dict | None = None, output: str | None = None,
                limit: int | None = None) -> Corpus:
    """List and check a corpus (see list_corpus and check_corpus: a wrong column fails here, in a second)."""
    files = list_corpus(uri, storage_options, output)
    check_corpus(files, columns, storage_options)
    return Corpus(files=files, collection=is_collection(uri, storage_options),
                  readable_on_driver=readable_on_the_driver(files, storage_options),
                  limits=split_limit(files, limit, storage_options, columns))


def corpus_needs_work(corpus: Corpus, settings: ReadSettings, complete: dict) -> bool:
    """Whether any corpus row still needs reading, asked before Ray starts: False when every row lies in a complete
    shard and no file grew or changed since (the same digest checks the read tasks make, stopping at the first shard
    with work). A corpus too large to read on the driver says True (its read tasks find out), so this check never
    costs a large corpus a second read."""
    if not corpus.readable_on_driver:
        return True
    for corpus_file in corpus.files:
        limit = None if corpus.limits is None else corpus.limits.get(corpus_file.name)
        if limit is not None and limit <= 0:
            continue
        read = read_parquet_shards if corpus_file.fmt == "parquet" else read_text_shards
        shards = read(corpus_file, complete.get(file_key(corpus_file.name), {}),
                      dataclasses.replace(settings, limit=limit))
        if next(shards, None) is not None:
            return True
    return False


def count_usable_prompts(corpus: Corpus, settings: ReadSettings) -> int:
    """--budget-images: a counting pass over the corpus on Ray Data (reading only)."""
    prompts = 0
    for batch in read_corpus(corpus.files, settings, limits=corpus.limits).iter_batches(batch_format="pyarrow",
                                                                                        batch_size=None):
        prompts += batch["status"].to_pylist().count("ok")
    return prompts
