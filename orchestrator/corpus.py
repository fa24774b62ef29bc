"""Corpus reading: txt, jsonl, csv/tsv and parquet, local or s3://, streamed into rows {prompt_id, prompt, source}.

First stage of the flow. Parsing is line by line, so a bad line becomes a quarantined row with its reason
instead of failing the read, and the driver never holds the corpus.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Iterator

import pyarrow as pa

CORPUS_FORMATS = ("txt", "jsonl", "csv", "tsv", "parquet")
PROMPT_COLUMNS = ("prompt", "caption", "text")
ID_COLUMNS = ("prompt_id", "id")
ROWS_PER_BLOCK = 4096

# What every corpus row looks like after reading; later stages add columns, never remove these.
CORPUS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


def corpus_format(path: str) -> str:
    """The corpus format named by a path's extension (`.ndjson` counts as jsonl)."""
    name = path.lower().rstrip("/")
    for suffix, fmt in ((".txt", "txt"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"),
                        (".tsv", "tsv"), (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{path}: unknown corpus format; use one of .txt .jsonl .csv .tsv .parquet")


def prompt_id_for(prompt: str) -> str:
    """Stable id of a prompt without an id column: a hash of its text (whitespace at the ends ignored)."""
    return hashlib.blake2b(prompt.strip().encode("utf-8"), digest_size=8).hexdigest()


def in_sample(prompt_id: str, fraction: float) -> bool:
    """Whether a prompt belongs to a stable pseudo-random sample: the same prompts at any corpus size or order."""
    digest = hashlib.blake2b(f"sample\x1f{prompt_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def corpus_record(prompt, raw_id, source: str) -> dict:
    """One corpus row; a prompt that cannot be rendered is kept as a quarantined row with the reason."""
    error = None
    if prompt is None:
        error = "prompt is missing or null"
    elif not isinstance(prompt, str):
        error = f"prompt is a {type(prompt).__name__}, not text"
    elif not prompt.strip():
        error = "prompt is empty or whitespace only"
    text = prompt.strip() if isinstance(prompt, str) else None
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        prompt_id = prompt_id_for(text) if text else f"quarantine-{hashlib.blake2b(source.encode(), digest_size=8).hexdigest()}"
    else:
        prompt_id = str(raw_id).strip()
    return {
        "prompt_id": prompt_id,
        "prompt": text,
        "source": source,
        "status": "quarantined" if error else "ok",
        "error": error,
    }


def _pick_column(columns: Iterable[str], wanted: tuple[str, ...]) -> str | None:
    by_lower = {c.lower(): c for c in columns}
    return next((by_lower[w] for w in wanted if w in by_lower), None)


def _decoded_lines(lines: Iterable[bytes], name: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, error) for each line; invalid UTF-8 is reported per line, not per file."""
    for number, raw in enumerate(lines, start=1):
        try:
            yield number, raw.decode("utf-8").rstrip("\r\n"), None
        except UnicodeDecodeError as exc:
            yield number, None, f"invalid UTF-8 at byte {exc.start} of the line"


def parse_lines(lines: Iterable[bytes], fmt: str, name: str) -> Iterator[dict]:
    """Corpus rows from the raw lines of one txt, jsonl, csv or tsv file (`name` is used in sources and errors)."""
    if fmt == "txt":
        yield from _parse_txt(lines, name)
    elif fmt == "jsonl":
        yield from _parse_jsonl(lines, name)
    elif fmt in ("csv", "tsv"):
        yield from _parse_delimited(lines, name, "," if fmt == "csv" else "\t")
    else:
        raise ValueError(f"{name}: parse_lines reads txt, jsonl, csv or tsv, not {fmt}")


def _parse_txt(lines: Iterable[bytes], name: str) -> Iterator[dict]:
    for number, text, error in _decoded_lines(lines, name):
        source = f"{name}:{number}"
        if error:
            yield corpus_record(None, None, source) | {"error": error}
        elif text != "":  # a truly empty line is a separator, not a prompt; whitespace-only lines are quarantined
            yield corpus_record(text, None, source)


def _parse_jsonl(lines: Iterable[bytes], name: str) -> Iterator[dict]:
    for number, text, error in _decoded_lines(lines, name):
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
        if isinstance(value, str):
            yield corpus_record(value, None, source)
        elif isinstance(value, dict):
            prompt_key = _pick_column(value.keys(), PROMPT_COLUMNS)
            id_key = _pick_column(value.keys(), ID_COLUMNS)
            if prompt_key is None:
                found = ", ".join(sorted(value.keys())) or "none"
                yield corpus_record(None, None, source) | {"error": f"no 'prompt' field (found: {found})"}
            else:
                yield corpus_record(value[prompt_key], value.get(id_key) if id_key else None, source)
        else:
            yield corpus_record(None, None, source) | {"error": f"a JSON {type(value).__name__}, expected an object or a string"}


def _parse_delimited(lines: Iterable[bytes], name: str, delimiter: str) -> Iterator[dict]:
    decoded = _decoded_lines(lines, name)
    bad: list[tuple[int, str]] = []

    def good_lines() -> Iterator[str]:
        # Invalid lines are set aside here and reported in order by the loop below.
        for number, text, error in decoded:
            if error:
                bad.append((number, error))
            else:
                yield text + "\n"

    reader = csv.reader(good_lines(), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    prompt_col = _pick_column(header, PROMPT_COLUMNS)
    if prompt_col is None:
        raise ValueError(f"{name} line 1: no 'prompt' column (found: {', '.join(header)})")
    prompt_index = header.index(prompt_col)
    id_col = _pick_column(header, ID_COLUMNS)
    id_index = header.index(id_col) if id_col else None
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield corpus_record(None, None, f"{name}:{reader.line_num}") | {"error": f"malformed row: {exc}"}
            continue
        while bad:
            number, error = bad.pop(0)
            yield corpus_record(None, None, f"{name}:{number}") | {"error": error}
        source = f"{name}:{reader.line_num}"
        if not fields:
            continue
        if len(fields) != len(header):
            yield corpus_record(None, None, source) | {
                "error": f"malformed row: {len(fields)} fields, the header has {len(header)}"
            }
            continue
        yield corpus_record(fields[prompt_index], fields[id_index] if id_index is not None else None, source)
    while bad:
        number, error = bad.pop(0)
        yield corpus_record(None, None, f"{name}:{number}") | {"error": error}


def parse_table(table: pa.Table, name: str, first_row: int = 0) -> Iterator[dict]:
    """Corpus rows from a parquet table; nulls and non-text prompts are quarantined, not fatal."""
    prompt_col = _pick_column(table.column_names, PROMPT_COLUMNS)
    if prompt_col is None:
        raise ValueError(f"{name}: no 'prompt' column (found: {', '.join(table.column_names)})")
    id_col = _pick_column(table.column_names, ID_COLUMNS)
    prompts = table.column(prompt_col).to_pylist()
    ids = table.column(id_col).to_pylist() if id_col else [None] * len(prompts)
    for offset, (prompt, raw_id) in enumerate(zip(prompts, ids)):
        yield corpus_record(prompt, raw_id, f"{name}:row{first_row + offset}")


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
    import fsspec
    import pyarrow.parquet as pq

    fmt = corpus_format(path)
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        if fmt == "parquet":
            first = 0
            for batch in pq.ParquetFile(f).iter_batches():
                table = pa.Table.from_batches([batch])
                yield from parse_table(table, path, first)
                first += table.num_rows
        else:
            yield from parse_lines(io.BufferedReader(f) if not hasattr(f, "__iter__") else f, fmt, path)
