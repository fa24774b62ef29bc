"""Corpus files and their rows: txt, jsonl, csv/tsv and parquet, compressed or not, local or s3://, one file, a
folder or a glob. Each row becomes {prompt_id, prompt, source, status, error}.

First stage of the flow. Parsing is line by line, so a bad line becomes a quarantined row with its reason
instead of failing the read, and the driver never holds the corpus. The reader (orchestrator/corpus/reader.py) cuts
these rows into shards.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa

CORPUS_FORMATS = ("txt", "jsonl", "csv", "tsv", "parquet")
FORMAT_SUFFIXES = ((".txt", "txt"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".tsv", "tsv"),
                   (".parquet", "parquet"), (".pq", "parquet"))
COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
# Column names looked for, in this order and ignoring case, when no --prompt-column / --id-column is given:
# `prompt` (DiffusionDB, PartiPrompts' `Prompt`), `prompts` (DrawBench), `caption` (COCO, Pick-a-Pic), `text`
# (LAION's `TEXT`); ids: `prompt_id`, `id`, `uid`. Without an id column, a prompt's id is a hash of its text.
PROMPT_COLUMNS = ("prompt", "prompts", "caption", "text")
ID_COLUMNS = ("prompt_id", "id", "uid")
ROWS_PER_BLOCK = 4096
# Longest prompt and id kept: far beyond any text encoder's context (77 CLIP tokens, 120-300 T5 tokens), small
# enough that one pathological line cannot bloat a block, a manifest row or a report page.
MAX_PROMPT_CHARS = 20_000
MAX_ID_CHARS = 512
# C0 control characters other than tab, newline and carriage return, and DEL: never part of a prompt anyone
# wrote, and NUL ends strings in C libraries downstream (tokenizers, image metadata, shell tools).
_CONTROL = frozenset(chr(c) for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])

# What every corpus row looks like after parsing; later stages add columns, never remove these.
CORPUS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


class CorpusError(ValueError):
    """A corpus that cannot be read at all (no file, unknown format, no prompt column); found before Ray starts."""


def corpus_format(path: str) -> str:
    """The corpus format named by a path's extension, after any compression suffix (`.jsonl.gz` is jsonl)."""
    name = path.lower().rstrip("/")
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for suffix, fmt in FORMAT_SUFFIXES:
        if name.endswith(suffix):
            return fmt
    raise CorpusError(f"{path}: unknown corpus format; use one of .txt .jsonl .csv .tsv .parquet "
                      f"(optionally compressed: {' '.join(COMPRESSION_SUFFIXES)})")


def compression_of(path: str) -> str | None:
    lowered = path.lower()
    return next((codec for suffix, codec in COMPRESSION_SUFFIXES.items() if lowered.endswith(suffix)), None)


@dataclass(frozen=True)
class Columns:
    """Which columns (or JSON fields) hold the prompt and the id: the user's choice, or detection by name."""

    prompt: str | None = None  # --prompt-column; None: the first of PROMPT_COLUMNS found
    id: str | None = None  # --id-column; None: the first of ID_COLUMNS found, else ids are text hashes

    def prompt_of(self, names) -> str | None:
        return pick_column(names, (self.prompt,) if self.prompt else PROMPT_COLUMNS)

    def id_of(self, names) -> str | None:
        return pick_column(names, (self.id,) if self.id else ID_COLUMNS)

    def check(self, where: str, names) -> None:
        """CorpusError in one line when the prompt column, or an id column named with --id-column, is not there:
        what was found, and the flag to use. (A detected id column may be absent: ids are then text hashes.)"""
        found = ", ".join(names) or "none"
        if self.prompt_of(names) is None:
            if self.prompt:
                raise CorpusError(f"{where}: no column {self.prompt!r} (--prompt-column; found: {found})")
            raise CorpusError(f"{where}: no prompt column (found: {found}); looked for {', '.join(PROMPT_COLUMNS)} "
                              "in any case; pass --prompt-column NAME")
        if self.id and self.id_of(names) is None:
            raise CorpusError(f"{where}: no column {self.id!r} (--id-column; found: {found})")


DETECT = Columns()


@dataclass(frozen=True)
class CorpusFile:
    """One file of a corpus. `name` is its path relative to the corpus root: it names the file's shards and its
    rows' sources, so the same corpus gives the same names however its location is spelled."""

    uri: str
    name: str
    fmt: str
    compression: str | None


def list_corpus(uri: str, storage_options: dict | None = None, output: str | None = None) -> list[CorpusFile]:
    """The files of a corpus: one file, every corpus file under a folder (recursively), or a glob's matches;
    never a file inside `output` (a run's --out inside its --prompts folder must not read its manifest back)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    glob = any(ch in path for ch in "*?[")
    if glob:
        root = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
        found = sorted(p for p in fs.glob(path) if not fs.isdir(p))
    elif fs.isdir(path):
        root = path.rstrip("/")
        found = sorted(p for p in fs.find(path) if _has_corpus_suffix(p))
    else:
        if not fs.exists(path):
            raise CorpusError(f"--prompts {uri}: no such file or folder")
        root, found = posixpath.dirname(path.rstrip("/")), [path]
    if output is not None:
        inside = fs._strip_protocol(os.path.abspath(output) if "://" not in output else output).rstrip("/")
        kept = [p for p in found if p.rstrip("/") != inside and not p.startswith(inside + "/")]
        if found and not kept:
            raise CorpusError(f"--prompts {uri}: its only corpus files are inside --out {output}, which holds what "
                              "seedsift writes; give the prompts' own file or folder")
        found = kept
    if not found:
        raise CorpusError(f"--prompts {uri}: no corpus files there (.txt .jsonl .csv .tsv .parquet, optionally "
                          f"{' '.join(COMPRESSION_SUFFIXES)})")
    files = []
    for found_path in found:
        name = found_path[len(root):].lstrip("/") if root and found_path.startswith(root) else posixpath.basename(found_path)
        files.append(CorpusFile(uri=protocol + found_path if protocol and "://" not in found_path else found_path,
                                name=name, fmt=corpus_format(found_path), compression=compression_of(found_path)))
    return files


def is_collection(uri: str, storage_options: dict | None = None) -> bool:
    """Whether --prompts names a folder or a glob (files that may come and go), not one file: there each file's
    ids are its own (see corpus_record)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return any(ch in path for ch in "*?[") or fs.isdir(path)


def _has_corpus_suffix(path: str) -> bool:
    try:
        corpus_format(path)
        return not posixpath.basename(path).startswith(".")
    except CorpusError:
        return False


def open_corpus_file(corpus_file: CorpusFile, storage_options: dict | None = None):
    """A binary stream of the file's (decompressed) bytes; the caller closes it."""
    return fsspec.open(corpus_file.uri, "rb", compression=corpus_file.compression, **(storage_options or {})).open()


CHECKED_FILES = 32  # files whose header or schema the driver checks before Ray starts
COUNTED_BYTES = {"local": 512 << 20, "remote": 64 << 20}  # text read to count lines up front, at most


def check_corpus(files: list[CorpusFile], columns: Columns = DETECT, storage_options: dict | None = None) -> None:
    """Find a corpus that cannot be read before Ray starts: each file's header (csv/tsv), schema (parquet) or
    first object (jsonl) must name a prompt column. Raises CorpusError with one line naming file, found, flag."""
    import pyarrow.parquet as pq

    for corpus_file in files[:CHECKED_FILES]:
        check_compression(corpus_file, storage_options)
        if corpus_file.fmt == "txt":
            continue
        with open_corpus_file(corpus_file, storage_options) as handle:
            if corpus_file.fmt == "parquet":
                parquet_columns(pq.ParquetFile(handle).schema_arrow.names, corpus_file.name, columns)
            elif corpus_file.fmt in ("csv", "tsv"):
                delimited_header(handle.readline(), corpus_file.name, "," if corpus_file.fmt == "csv" else "\t",
                                 columns)
            else:
                for _ in range(64):  # the first object that parses decides; broken lines are quarantined later
                    line = handle.readline()
                    if not line:
                        break
                    try:
                        value = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(value, dict):
                        columns.check(f"{corpus_file.name} (first object)", sorted(value))
                    break


# The first bytes of each compressed format: a file named .gz that holds plain text is found before Ray starts.
MAGIC = {"gzip": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd"}


def check_compression(corpus_file: CorpusFile, storage_options: dict | None = None) -> None:
    """CorpusError naming the file when its name says compressed and its first bytes say otherwise. (Damage
    further in is found while reading: the rows before it are delivered, the file reported as a failed row.)"""
    magic = MAGIC.get(corpus_file.compression or "")
    if magic is None:
        return
    with fsspec.open(corpus_file.uri, "rb", **(storage_options or {})) as handle:
        head = handle.read(len(magic))
    if head != magic:
        raise CorpusError(f"{corpus_file.name}: not {corpus_file.compression} data (it starts with {head[:8]!r}), "
                          f"though its name says so; compress it, or name it without {corpus_file.uri.rsplit('.', 1)[-1]!r}")


def readable_on_the_driver(files: list[CorpusFile], storage_options: dict | None = None) -> bool:
    """Whether the driver may read the corpus's text up front (at most COUNTED_BYTES of it, decompressed about 5x);
    Parquet files count nothing here: their row counts and shard checks come from metadata."""
    budget = {"local": COUNTED_BYTES["local"], "remote": COUNTED_BYTES["remote"]}
    for corpus_file in files:
        if corpus_file.fmt == "parquet":
            continue
        fs, path = fsspec.core.url_to_fs(corpus_file.uri, **(storage_options or {}))
        where = "local" if "local" in type(fs).__name__.lower() else "remote"
        budget[where] -= fs.size(path) * (5 if corpus_file.compression else 1)
        if budget[where] < 0:
            return False
    return True


def count_rows(files: list[CorpusFile], storage_options: dict | None = None) -> tuple[int | None, bool]:
    """Corpus rows counted cheaply up front: exact for parquet (its metadata), lines for text files of moderate
    size. Returns (rows, exact); rows is None when a file is too large to count without reading it all."""
    import pyarrow.parquet as pq

    total, exact = 0, True
    for corpus_file in files:
        fs, path = fsspec.core.url_to_fs(corpus_file.uri, **(storage_options or {}))
        if corpus_file.fmt == "parquet":
            with fs.open(path, "rb") as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
            continue
        local = "local" in type(fs).__name__.lower()
        size = fs.size(path) * (5 if corpus_file.compression else 1)
        if size > COUNTED_BYTES["local" if local else "remote"]:
            return None, False
        lines, last = 0, b"\n"
        with open_corpus_file(corpus_file, storage_options) as handle:
            try:
                while chunk := handle.read(1 << 20):
                    lines += chunk.count(b"\n") - chunk.count(b"\n\n")  # blank lines are no rows
                    last = chunk[-1:]
            except (EOFError, ValueError, OSError):  # damaged compressed data: the reader reports it, row by row
                pass
        lines += last != b"\n"
        total += lines - (corpus_file.fmt in ("csv", "tsv"))
        exact = False  # blank lines and multi-line csv fields make a line count an estimate
    return total, exact


# --- identity -----------------------------------------------------------------------------------------------------


def prompt_id_for(prompt: str) -> str:
    """Stable id of a prompt without an id column: a hash of its text (whitespace at the ends ignored)."""
    return hashlib.blake2b(prompt.strip().encode("utf-8"), digest_size=8).hexdigest()


def in_sample(prompt_id: str, fraction: float) -> bool:
    """Whether a prompt belongs to a stable pseudo-random sample: the same prompts at any corpus size or order."""
    digest = hashlib.blake2b(f"sample\x1f{prompt_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def _digest64(kind: str, value: str) -> int:
    digest = int.from_bytes(hashlib.blake2b(f"{kind}\x1f{value}".encode("utf-8"), digest_size=8).digest(), "big")
    return digest or 1  # 0 means "no key"


def id_digest(prompt_id: str) -> int:
    """64-bit digest of a prompt id: what duplicate detection compares."""
    return _digest64("id", prompt_id)


def text_digest(prompt: str | None) -> int:
    """64-bit digest of a prompt's text, trimmed, case and inner whitespace ignored; 0 for no text."""
    return _digest64("text", " ".join(prompt.split()).casefold()) if prompt else 0


# --- rows ------------------------------------------------------------------------------------------------------


def _text_problem(value: str, what: str, longest: int) -> str | None:
    """Why a string cannot be stored or rendered, or None: lone surrogates (valid JSON escapes such as \\ud800,
    but not Unicode, so Arrow cannot encode them), control characters, or more than `longest` characters."""
    if len(value) > longest:
        return f"{what} is {len(value):,} characters long (at most {longest:,} are kept)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{what} holds a lone surrogate (U+{ord(value[exc.start]):04X}), which is not valid Unicode"
    control = next((ch for ch in value if ch in _CONTROL), None)
    if control is not None:
        return f"{what} holds a control character (U+{ord(control):04X})"
    return None


def _printable(value: str, longest: int = 80) -> str:
    """A string safe to store and show: surrogates and control characters escaped, cut to `longest`."""
    cleaned = value[:longest].encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(f"\\x{ord(ch):02x}" if ch in _CONTROL else ch for ch in cleaned)


def corpus_record(prompt, raw_id, source: str, id_scope: str | None = None) -> dict:
    """One corpus row; a prompt or id that cannot be used is kept as a quarantined row with the reason.

    Whatever the input, the row holds only storable text: a quarantined row keeps at most an escaped excerpt of a
    bad prompt, and a bad id is replaced by one derived from the row's source. `id_scope`, the file's name in a
    folder or glob corpus, qualifies an id the corpus gives (`NAME#ID`): ids need only be unique within a file.
    Hashed ids stay bare, so the same text in two files is still one prompt (a duplicate).
    """
    error = None
    if prompt is None:
        error = "prompt is missing or null"
    elif not isinstance(prompt, str):
        error = f"prompt is a {type(prompt).__name__}, not text"
    elif not prompt.strip():
        error = "prompt is empty or whitespace only"
    else:
        error = _text_problem(prompt, "prompt", MAX_PROMPT_CHARS)
    text = prompt.strip() if isinstance(prompt, str) else None
    if error is not None and text:
        text = _printable(text, 200)  # storable, and enough for the report: a quarantined row is never rendered
    id_error = None
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, float, type(None))):
        id_error = f"id is a {type(raw_id).__name__}, not text or a number"
    elif isinstance(raw_id, str):
        id_error = _text_problem(raw_id, "id", MAX_ID_CHARS)
    fallback = f"quarantine-{hashlib.blake2b(source.encode(), digest_size=8).hexdigest()}"
    if id_error is not None:
        prompt_id = fallback
        error = error or id_error
    elif raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        prompt_id = prompt_id_for(text) if text else fallback
    else:
        prompt_id = str(raw_id).strip()
        if id_scope is not None:
            prompt_id = f"{id_scope}#{prompt_id}"
    return {
        "prompt_id": prompt_id,
        "prompt": text,
        "source": source,
        "status": "quarantined" if error else "ok",
        "error": error,
    }


def pick_column(columns: Iterable[str], wanted: tuple[str, ...]) -> str | None:
    by_lower = {c.lower(): c for c in columns}
    return next((by_lower[w] for w in wanted if w in by_lower), None)


def _decoded_lines(lines: Iterable[bytes], first_line: int) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, error) for each line; invalid UTF-8 is reported per line, not per file."""
    for number, raw in enumerate(lines, start=first_line):
        try:
            yield number, raw.decode("utf-8").rstrip("\r\n"), None
        except UnicodeDecodeError as exc:
            yield number, None, f"invalid UTF-8 at byte {exc.start} of the line"


def parse_lines(lines: Iterable[bytes], fmt: str, name: str, first_line: int = 1,
                header: list[str] | None = None, columns: Columns = DETECT, ids_per_file: bool = False
                ) -> Iterator[dict]:
    """Corpus rows from the raw lines of one txt, jsonl, csv or tsv file (`name` is used in sources and errors;
    with `ids_per_file` it also qualifies the ids the file gives, see corpus_record).

    Lazy: it pulls a line only when it needs one, so a caller can tell where in the file each row ends. A csv/tsv
    parse resumed mid-file takes the file's `header` and the number of the first line it gets.
    """
    scope = name if ids_per_file else None
    if fmt == "txt":
        yield from _parse_txt(lines, name, first_line)
    elif fmt == "jsonl":
        yield from _parse_jsonl(lines, name, first_line, columns, scope)
    elif fmt in ("csv", "tsv"):
        yield from _parse_delimited(lines, name, "," if fmt == "csv" else "\t", first_line, header, columns, scope)
    else:
        raise ValueError(f"{name}: parse_lines reads txt, jsonl, csv or tsv, not {fmt}")


def _parse_txt(lines: Iterable[bytes], name: str, first_line: int) -> Iterator[dict]:
    for number, text, error in _decoded_lines(lines, first_line):
        source = f"{name}:{number}"
        if error:
            yield corpus_record(None, None, source) | {"error": error}
        elif text != "":  # a truly empty line is a separator, not a prompt; whitespace-only lines are quarantined
            yield corpus_record(text, None, source)


def _parse_jsonl(lines: Iterable[bytes], name: str, first_line: int, columns: Columns, scope: str | None
                 ) -> Iterator[dict]:
    for number, text, error in _decoded_lines(lines, first_line):
        source = f"{name}:{number}"
        if error:
            yield corpus_record(None, None, source) | {"error": error}
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield corpus_record(None, None, source) | {"error": f"malformed JSON: {exc.msg} at column {exc.colno}"}
            continue
        except RecursionError:
            yield corpus_record(None, None, source) | {"error": "malformed JSON: nested too deeply"}
            continue
        if isinstance(value, str):
            yield corpus_record(value, None, source)
        elif isinstance(value, dict):
            prompt_key = columns.prompt_of(value.keys())
            id_key = columns.id_of(value.keys())
            if prompt_key is None:
                found = ", ".join(sorted(value.keys())) or "none"
                wanted = repr(columns.prompt) if columns.prompt else "'prompt'"
                yield corpus_record(None, None, source) | {"error": f"no {wanted} field (found: {found})"}
            else:
                yield corpus_record(value[prompt_key], value.get(id_key) if id_key else None, source, scope)
        else:
            yield corpus_record(None, None, source) | {"error": f"a JSON {type(value).__name__}, expected an object or a string"}


def delimited_header(line: bytes, name: str, delimiter: str, columns: Columns = DETECT) -> list[str]:
    """The header fields of a csv/tsv file's first line; a missing prompt column is a CorpusError naming the fix."""
    text = line.decode("utf-8-sig", errors="replace").rstrip("\r\n")  # a byte-order mark is not part of a name
    header = next(csv.reader([text], delimiter=delimiter), [])
    columns.check(f"{name} line 1", header)
    return header


def _parse_delimited(lines: Iterable[bytes], name: str, delimiter: str, first_line: int,
                     header: list[str] | None, columns: Columns, scope: str | None) -> Iterator[dict]:
    lines = iter(lines)
    if header is None:
        first = next(lines, None)
        if first is None:
            return
        header = delimited_header(first, name, delimiter, columns)
        first_line += 1
    decoded = _decoded_lines(lines, first_line)
    bad: list[tuple[int, str]] = []
    last_number = [first_line - 1]

    def good_lines() -> Iterator[str]:
        # Invalid lines are set aside here and reported in order by the loop below.
        for number, text, error in decoded:
            last_number[0] = number
            if error:
                bad.append((number, error))
                yield "\n"  # an empty line for the csv reader, which it skips
            else:
                yield text + "\n"

    reader = csv.reader(good_lines(), delimiter=delimiter)
    prompt_index = header.index(columns.prompt_of(header))
    id_col = columns.id_of(header)
    id_index = header.index(id_col) if id_col else None
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield corpus_record(None, None, f"{name}:{last_number[0]}") | {"error": f"malformed row: {exc}"}
            continue
        while bad:
            number, error = bad.pop(0)
            yield corpus_record(None, None, f"{name}:{number}") | {"error": error}
        source = f"{name}:{last_number[0]}"
        if not fields:
            continue
        if len(fields) != len(header):
            yield corpus_record(None, None, source) | {
                "error": f"malformed row: {len(fields)} fields, the header has {len(header)}"
            }
            continue
        yield corpus_record(fields[prompt_index], fields[id_index] if id_index is not None else None, source, scope)
    while bad:
        number, error = bad.pop(0)
        yield corpus_record(None, None, f"{name}:{number}") | {"error": error}


def parquet_columns(names: list[str], file_name: str, columns: Columns = DETECT) -> tuple[str, str | None]:
    """The prompt and id columns of a parquet file's schema; a missing prompt column is a CorpusError."""
    columns.check(file_name, names)
    return columns.prompt_of(names), columns.id_of(names)


def parse_table(table: pa.Table, name: str, first_row: int = 0, columns: Columns = DETECT,
                ids_per_file: bool = False) -> Iterator[dict]:
    """Corpus rows from a parquet table; nulls and non-text prompts are quarantined, not fatal. `ids_per_file`: as
    for parse_lines."""
    scope = name if ids_per_file else None
    prompt_col, id_col = parquet_columns(table.column_names, name, columns)
    prompts = table.column(prompt_col).to_pylist()
    ids = table.column(id_col).to_pylist() if id_col else [None] * len(prompts)
    for offset, (prompt, raw_id) in enumerate(zip(prompts, ids)):
        yield corpus_record(prompt, raw_id, f"{name}:row{first_row + offset}", scope)


def rows_to_blocks(rows: Iterable[dict], rows_per_block: int = ROWS_PER_BLOCK) -> Iterator[pa.Table]:
    """Group rows into Arrow tables of the corpus schema, so a reader streams bounded blocks."""
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= rows_per_block:
            yield pa.Table.from_pylist(chunk, schema=CORPUS_SCHEMA)
            chunk = []
    if chunk:
        yield pa.Table.from_pylist(chunk, schema=CORPUS_SCHEMA)


def read_corpus_local(path: str, storage_options: dict | None = None) -> Iterator[dict]:
    """All rows of a corpus through fsspec, without Ray: for small corpora, tools and tests."""
    import pyarrow.parquet as pq

    for corpus_file in list_corpus(path, storage_options):
        with open_corpus_file(corpus_file, storage_options) as f:
            if corpus_file.fmt == "parquet":
                first = 0
                for batch in pq.ParquetFile(f).iter_batches():
                    table = pa.Table.from_batches([batch])
                    yield from parse_table(table, corpus_file.name, first)
                    first += table.num_rows
            else:
                yield from parse_lines(io.BufferedReader(f) if not hasattr(f, "__iter__") else f, corpus_file.fmt,
                                       corpus_file.name)
