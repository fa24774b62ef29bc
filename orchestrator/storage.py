"""Output storage through fsspec: local folders and s3:// alike, with atomic object writes.

Used by the sink and the jobs. Credentials come from the AWS/fsspec chain or `storage_options`, never logged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger("seedsift")

# Object-store calls are retried by botocore itself (standard mode: exponential backoff with jitter, capped at 20 s
# a wait), so a brief outage or throttling is ridden out inside each write. 10 attempts cover an outage of about a
# minute; users override any of these through storage_options (for instance `{"config_kwargs": {"retries":
# {"max_attempts": 3}}}`).
S3_DEFAULTS = {
    "config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 60},
}
TEMPORARY_MARK = ".tmp-"  # local writes go to `<key>.tmp-<uuid>` first, then os.replace


def with_storage_defaults(uri: str, storage_options: dict | None) -> dict:
    """storage_options with seedsift's retry defaults for s3:// URIs; user values win, key by key."""
    options = dict(storage_options or {})
    if fsspec.utils.get_protocol(uri) not in ("s3", "s3a"):
        return options
    config = dict(S3_DEFAULTS["config_kwargs"])
    config.update(options.get("config_kwargs") or {})
    options["config_kwargs"] = config
    return options


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
            self._fs, _ = fsspec.core.url_to_fs(self.uri, **with_storage_defaults(self.uri, self.storage_options))
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
            temporary = f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex}"
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
            return
        try:
            self.fs.pipe_file(path, data)
        except Exception as exc:  # botocore already retried with backoff: the store is down or refusing writes
            raise OSError(
                f"output {self.uri}: writing {key} failed after retries ({type(exc).__name__}: {exc}); the object "
                "store is unreachable or refusing writes. Nothing partial was committed: rerun the same command "
                "once the store is back and it resumes"
            ) from exc

    def sweep_temporaries(self) -> int:
        """Delete `*.tmp-*` files left by local writes of a killed run; returns how many. Call before a run starts.

        Only for local outputs (an S3 PUT leaves nothing behind). Runs into one output must not overlap (see
        deploy/cron.md), so every temporary file found here belongs to a dead writer.
        """
        if not self.is_local:
            return 0
        root = self.path("")
        removed = 0
        for folder, _, files in os.walk(root):
            for name in files:
                if TEMPORARY_MARK in name:
                    try:
                        os.remove(os.path.join(folder, name))
                        removed += 1
                    except FileNotFoundError:
                        pass
        if removed:
            logger.info("removed %d temporary files left by an interrupted run under %s", removed, self.uri)
        return removed

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
        self.fs.invalidate_cache(base)  # s3fs caches listings per process: other workers may have added keys since
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


def storage_error_in(exc: BaseException) -> OSError | None:
    """The storage error (raised by Output with the output named) behind a Ray Data failure, if there is one.

    Ray Data wraps a failed stage in UserCodeException/RayTaskError; the driver can re-raise this cause so the
    job prints one line naming the output instead of a traceback.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and str(exc).startswith("output "):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
