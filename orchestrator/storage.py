"""Output storage through fsspec: local folders and s3:// alike, with atomic object writes.

Used by the sink and the jobs. Credentials come from the AWS/fsspec chain or `storage_options`, never logged.
"""

from __future__ import annotations

import io
import json
import os
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


class Output:
    """An output root (`/path` or `s3://bucket/prefix`) that can be pickled to Ray workers and reopened there."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._fs = None

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "storage_options": self.storage_options, "_fs": None}

    def __repr__(self) -> str:  # never print storage_options: they may hold credentials
        return f"Output({self.uri!r})"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs, _ = fsspec.core.url_to_fs(self.uri, **self.storage_options)
        return self._fs

    @property
    def is_local(self) -> bool:
        return "file" in fsspec.utils.get_protocol(self.uri) or "local" in type(self.fs).__name__.lower()

    def path(self, key: str) -> str:
        root = self.fs._strip_protocol(self.uri)
        return f"{root}/{key}" if key else root

    def uri_of(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object whole or not at all: an S3 PUT is atomic; a local file goes through a temporary name."""
        path = self.path(key)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temporary = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        else:
            self.fs.pipe_file(path, data)

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def write_json(self, key: str, value: dict) -> None:
        self.write_bytes(key, json.dumps(value, indent=2, sort_keys=True).encode("utf-8"))

    def read_json(self, key: str) -> dict:
        return json.loads(self.read_bytes(key))

    def write_table(self, key: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(key, buffer.getvalue())

    def list_keys(self, folder: str, suffix: str = "") -> list[str]:
        """Keys directly under `folder`, sorted; temporary files of unfinished local writes are not listed."""
        base = self.path(folder)
        if not self.fs.exists(base):
            return []
        root = self.path("")
        keys = []
        for entry in self.fs.ls(base, detail=False):
            key = entry[len(root) :].lstrip("/") if entry.startswith(root) else entry
            if key.endswith(suffix) and ".tmp-" not in key:
                keys.append(key)
        return sorted(keys)

    def read_tables(self, keys: list[str], columns: list[str] | None = None) -> pa.Table | None:
        """Concatenated parquet objects (only the named columns), or None when there are none."""
        tables = [pq.read_table(io.BytesIO(self.read_bytes(k)), columns=columns) for k in keys]
        return pa.concat_tables(tables) if tables else None

    def check_writable(self) -> None:
        """Fail early with a clear message when the output cannot be written (missing bucket, no permission, offline)."""
        probe = f".seedsift-probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"probe")
            self.fs.rm_file(self.path(probe))
        except Exception as exc:  # any storage error means the job cannot run: say which output and why
            raise OSError(
                f"output {self.uri} is not writable ({type(exc).__name__}: {exc}); check the path or bucket, "
                "the credentials (AWS_* variables or --storage-options) and AWS_ENDPOINT_URL"
            ) from exc
