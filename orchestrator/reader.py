"""Corpus reading on Ray Data: a streaming datasource for txt/jsonl/csv/tsv and Ray's parquet reader for parquet.

First stage of the flow; rows come out in blocks of the corpus schema, quarantined rows included.
"""

from __future__ import annotations

import io

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.data.datasource import FileBasedDatasource

from orchestrator.corpus import CORPUS_SCHEMA, corpus_format, in_sample, parse_lines, parse_table, rows_to_blocks

READ_CPUS = 0.25  # reading is I/O bound; a whole core would starve the model stages on small machines


class CorpusTextDatasource(FileBasedDatasource):
    """Streams one text corpus file line by line into bounded blocks; bad lines become quarantined rows."""

    def __init__(self, paths, fmt: str, display_name: str, **kwargs):
        super().__init__(paths, **kwargs)
        self.fmt = fmt
        self.display_name = display_name

    def _read_stream(self, f: pa.NativeFile, path: str):
        yield from rows_to_blocks(parse_lines(io.BufferedReader(f), self.fmt, self.display_name))


def _normalise_parquet(table: pa.Table, display_name: str) -> pa.Table:
    return pa.Table.from_pylist(list(parse_table(table, display_name)), schema=CORPUS_SCHEMA)


def arrow_filesystem(uri: str, storage_options: dict | None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem over fsspec, so s3:// reads use the same endpoint and credential chain as writes."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if "local" in type(fs).__name__.lower():
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _keep_sample(table: pa.Table, fraction: float) -> pa.Table:
    mask = [in_sample(prompt_id, fraction) for prompt_id in table["prompt_id"].to_pylist()]
    return table.filter(pa.array(mask, type=pa.bool_()))


def read_corpus(uri: str, storage_options: dict | None = None, limit: int | None = None,
                sample: float | None = None) -> ray.data.Dataset:
    """A Ray dataset of corpus rows; the driver only lists the file, workers stream it."""
    fmt = corpus_format(uri)
    filesystem, path = arrow_filesystem(uri, storage_options)
    if fmt == "parquet":
        ds = ray.data.read_parquet(path, filesystem=filesystem, num_cpus=READ_CPUS)
        ds = ds.map_batches(_normalise_parquet, batch_format="pyarrow", fn_kwargs={"display_name": uri},
                            num_cpus=READ_CPUS, batch_size=None)
    else:
        source = CorpusTextDatasource(path, fmt, uri, filesystem=filesystem)
        ds = ray.data.read_datasource(source, num_cpus=READ_CPUS)
    if sample is not None and sample < 1:
        ds = ds.map_batches(_keep_sample, batch_format="pyarrow", fn_kwargs={"fraction": sample},
                            num_cpus=READ_CPUS, batch_size=None)
    return ds.limit(limit) if limit else ds
