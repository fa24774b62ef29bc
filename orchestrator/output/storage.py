"""Output storage through fsspec: local folders and s3:// alike, with atomic object writes.

Used by the manifest, the sink, the lease and the jobs. Credentials come from the AWS/fsspec chain or
`storage_options`, and are never logged.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

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
PROBE_PREFIX = ".seedsift-probe-"  # check_writable's probe object, deleted at once
LOCK_SUFFIX = ".lock"  # beside a local object replaced under a lock (replace_if_version)
IO_THREADS = 16  # concurrent small reads (manifest footers, parts): object stores answer many requests at once


class StorageError(OSError):
    """The output could not be read or written after the store's own retries; the message names the output."""


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (create-only) or changed since it was read (if-match)."""


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
    """An output root (`/path` or `s3://bucket/prefix`) that can be pickled to Ray workers and reopened there.

    Keys are always relative to the root, with `/` separators; nothing outside the root is reachable.
    """

    def __init__(self, uri: str, storage_options: dict | None = None):
        uri = uri.rstrip("/") or "/"
        if "://" not in uri:  # one spelling per local folder, so keys and URIs do not depend on how it was typed
            uri = os.path.abspath(os.path.expanduser(uri))
        self.uri = uri
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
        return "://" not in self.uri or self.uri.startswith("file://")

    def path(self, key: str) -> str:
        root = self.fs._strip_protocol(self.uri)
        return f"{root}/{key}" if key else root

    def uri_of(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def key_of(self, path: str) -> str:
        """The key of a path returned by a listing of this output."""
        root = self.path("")
        path = os.path.abspath(path) if self.is_local else path
        return path[len(root):].lstrip("/") if path.startswith(root) else path

    # --- writing --------------------------------------------------------------------------------------------

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object whole or not at all: an S3 PUT is atomic; a local file goes through a temporary name."""
        path = self.path(key)
        if self.is_local:
            temporary = f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex}"
            try:
                with _create_local(temporary) as f:
                    f.write(data)
                os.replace(temporary, path)
            except OSError as exc:  # a full disk, a read-only mount, a permission: one line naming the output
                with contextlib.suppress(OSError):
                    os.remove(temporary)
                raise self._storage_error(f"writing {key}", exc) from exc
            return
        self._guard(f"writing {key}", self.fs.pipe_file, path, data)

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[io.BufferedIOBase]:
        """A file to stream a large object into (a WebDataset tar); it appears under `key` only when closed whole.

        Local: a temporary file renamed at the end. S3: s3fs's multipart upload, which S3 completes atomically.
        """
        path = self.path(key)
        if self.is_local:
            temporary = f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex}"
            try:
                with _create_local(temporary) as f:
                    yield f
                os.replace(temporary, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(temporary)
            return
        try:
            with self.fs.open(path, "wb") as f:
                yield f
        except StorageError:
            raise
        except Exception as exc:
            raise self._storage_error(f"writing {key}", exc) from exc

    def create_exclusive(self, key: str, data: bytes) -> None:
        """Create `key` only if it does not exist (S3 `If-None-Match: *`, a hard link locally); else raise
        PreconditionFailed. The lease rests on this."""
        path = self.path(key)
        if self.is_local:
            temporary = f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex}"
            with _create_local(temporary) as f:
                f.write(data)
            try:
                os.link(temporary, path)  # fails if `path` exists, atomically, on every POSIX filesystem
            except FileExistsError as exc:
                raise PreconditionFailed(key) from exc
            finally:
                os.remove(temporary)
            return
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError as exc:
            raise PreconditionFailed(key) from exc
        except Exception as exc:
            raise self._storage_error(f"creating {key}", exc) from exc

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        """An object's bytes and its version (the ETag on S3, a content hash locally) for replace_if_version."""
        path = self.path(key)
        if self.is_local:
            with open(path, "rb") as f:
                data = f.read()
            return data, _content_version(data)
        etag = self._guard(f"reading {key}", self.fs.info, path).get("ETag", "")
        return self.read_bytes(key), etag

    def replace_if_version(self, key: str, data: bytes, version: str) -> None:
        """Overwrite `key` only if it is still at `version` (from read_versioned); else raise PreconditionFailed.

        S3: a PUT with `If-Match: <ETag>`. Locally the compare and the rename run under an exclusive flock of a
        sibling lock file, so two processes on this machine (or on a filesystem with working POSIX locks) cannot
        both win.
        """
        path = self.path(key)
        if self.is_local:
            import fcntl

            with open(f"{path}{LOCK_SUFFIX}", "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    with open(path, "rb") as f:
                        current = f.read()
                except FileNotFoundError as exc:
                    raise PreconditionFailed(key) from exc
                if _content_version(current) != version:
                    raise PreconditionFailed(key)
                self.write_bytes(key, data)
            return
        try:
            self.fs.pipe_file(path, data, IfMatch=version)
        except FileNotFoundError as exc:
            raise PreconditionFailed(key) from exc
        except Exception as exc:  # s3fs maps most failures to OSError, but a dead endpoint surfaces as botocore's
            if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
                raise PreconditionFailed(key) from exc
            raise self._storage_error(f"replacing {key}", exc) from exc

    def modified(self, key: str) -> float:
        """When an object was last written, by the store's clock (seconds since the epoch)."""
        info = self._guard(f"reading {key}", self.fs.info, self.path(key))
        stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
        return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)

    def delete(self, keys: Iterable[str]) -> int:
        """Delete these objects (missing ones are fine); returns how many were asked for."""
        paths = [self.path(key) for key in keys]
        if not paths:
            return 0
        if self.is_local:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            return len(paths)
        self._guard("deleting objects", self.fs.rm, paths)  # s3fs batches these into DeleteObjects calls
        return len(paths)

    def move(self, key: str, new_key: str) -> None:
        """Move one object to another key of this output (an S3 copy then delete; a local rename)."""
        if self.is_local:
            os.makedirs(os.path.dirname(self.path(new_key)), exist_ok=True)
            self._guard(f"moving {key}", os.replace, self.path(key), self.path(new_key))
            return
        self._guard(f"moving {key}", self.fs.mv, self.path(key), self.path(new_key))

    def remove_empty_folder(self, folder: str) -> None:
        """Remove a local folder (and its empty parents inside the output) once nothing is left in it; object
        stores have no folders, so there is nothing to do there."""
        if not self.is_local:
            return
        path, root = self.path(folder), self.path("")
        while path.startswith(root + "/") and path != root:
            try:
                os.rmdir(path)
            except OSError:  # not empty, or already gone
                return
            path = os.path.dirname(path)

    def write_json(self, key: str, value: dict) -> None:
        self.write_bytes(key, json.dumps(value, indent=2, sort_keys=True).encode("utf-8"))

    def write_table(self, key: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(key, buffer.getvalue())

    # --- reading --------------------------------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        return self._guard(f"reading {key}", self.fs.cat_file, self.path(key))

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return self._guard(f"reading {key}", self.fs.cat_file, self.path(key), start=start, end=start + length)

    def read_tail(self, key: str, length: int) -> bytes:
        """The last `length` bytes of an object (one ranged GET on S3): enough for a Parquet footer."""
        size = self.size(key)
        return self.read_range(key, max(0, size - length), min(size, length))

    def size(self, key: str) -> int:
        return int(self._guard(f"reading {key}", self.fs.size, self.path(key)))

    def exists(self, key: str) -> bool:
        return self._guard(f"reading {key}", self.fs.exists, self.path(key))

    def read_json(self, key: str) -> dict:
        return json.loads(self.read_bytes(key))

    def read_json_if_there(self, key: str) -> dict | None:
        """The object as JSON, or None when there is none: one GET (no existence check before it)."""
        try:
            return self.read_json(key)
        except FileNotFoundError:
            return None

    def read_table(self, key: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(key)), columns=columns)

    def list_keys(self, folder: str, suffix: str = "") -> list[str]:
        """Keys under `folder` (at any depth), sorted; temporary files of unfinished local writes are not listed."""
        base = self.path(folder)
        self.fs.invalidate_cache(base)  # s3fs caches listings per process: other workers may have added keys since
        found = self._guard(f"listing {folder}", self._find, base)
        keys = [self.key_of(path) for path in list(found)]
        return sorted(key for key in keys if key.endswith(suffix) and TEMPORARY_MARK not in key)

    def top_level(self) -> list[str]:
        """Names directly under the output's root, sorted (one listing, whatever lies deeper); [] for none."""
        return self.names_in("")

    def names_in(self, folder: str) -> list[str]:
        """Names directly under `folder` ("" the root), sorted: one listing, not the keys deeper down (on S3 one
        delimited LIST, whatever the folder holds below); [] for a folder that is not there."""
        root = self.path(folder)
        self.fs.invalidate_cache(root)
        try:
            entries = self._guard(f"listing {folder or 'the output'}", self.fs.ls, root, detail=False)
        except FileNotFoundError:
            return []
        except StorageError as exc:  # a local path under a file holds nothing: check_writable then says why
            if isinstance(exc.__cause__, NotADirectoryError):
                return []
            raise
        names = sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries})
        return [name for name in names if TEMPORARY_MARK not in name and name != root.rstrip("/").rsplit("/", 1)[-1]]

    def list_sizes(self, folder: str, suffix: str = "") -> dict[str, int]:
        """Like list_keys, with each object's size (one listing; no request per object)."""
        base = self.path(folder)
        self.fs.invalidate_cache(base)
        found = self._guard(f"listing {folder}", self._find, base, True)
        sizes = {self.key_of(path): int(info.get("size") or 0) for path, info in found.items()}
        return {key: sizes[key] for key in sorted(sizes) if key.endswith(suffix) and TEMPORARY_MARK not in key}

    def read_tail_of(self, key: str, size: int, length: int) -> bytes:
        """The last `length` bytes of an object whose size is known from a listing: one ranged GET."""
        return self.read_range(key, max(0, size - length), min(size, length))

    def _find(self, base: str, detail: bool = False):
        try:
            return self.fs.find(base, detail=detail)
        except FileNotFoundError:
            return {} if detail else []

    def read_many(self, keys: list[str], read: Callable[[str], object]) -> list:
        """`read(key)` for many keys, concurrently (the store serves many requests at once), results in order."""
        if len(keys) <= 1:
            return [read(key) for key in keys]
        with ThreadPoolExecutor(min(IO_THREADS, len(keys))) as pool:
            return list(pool.map(read, keys))

    def check_writable(self) -> None:
        """Fail early with a clear message when the output cannot be written (no bucket, no permission, offline)."""
        probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"probe")
            self.fs.rm_file(self.path(probe))
        except Exception as exc:  # any storage error means the job cannot run: say which output and why
            root = exc.__cause__ if isinstance(exc, StorageError) and exc.__cause__ is not None else exc
            cause = f"{type(root).__name__}: {root}"
            if _is_full(exc):  # the store, not the command: free space and the same command works (exit 3)
                raise StorageError(f"output {self.uri} is full ({cause}); free space, then rerun the same command")
            if _is_unreachable(exc):  # the store is down, not the command wrong: the same command will work later
                raise StorageError(f"output {self.uri} cannot be reached ({cause}); rerun the same command once "
                                   "the store is back") from exc
            from orchestrator.run.config import ConfigError

            raise ConfigError(f"output {self.uri} is not writable ({cause}); check the path or bucket, the "
                              "credentials (AWS_* variables or --storage-options) and AWS_ENDPOINT_URL") from exc

    def sweep_temporaries(self) -> int:
        """Delete `*.tmp-*` files left by local writes of a killed run; returns how many.

        Only for local outputs (an S3 PUT leaves nothing behind), and only by the run that holds the output's
        lease: nobody else writes there, so every temporary file found belongs to a dead writer.
        """
        if not self.is_local:
            return 0
        removed = 0
        for folder, _, files in os.walk(self.path("")):
            for name in files:
                if TEMPORARY_MARK in name:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(folder, name))
                        removed += 1
        if removed:
            logger.info("removed %d temporary files left by an interrupted run under %s", removed, self.uri)
        return removed

    # --- errors ---------------------------------------------------------------------------------------------

    def _guard(self, what: str, call, *args, **kwargs):
        """Run a storage call; a failure that outlived botocore's retries becomes one StorageError naming the
        output. Missing objects stay FileNotFoundError: callers decide what absence means."""
        try:
            return call(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:  # fsspec backends raise their own types (OSError, botocore, aiohttp, ...)
            raise self._storage_error(what, exc) from exc

    def _storage_error(self, what: str, exc: BaseException) -> StorageError:
        cause = f"output {self.uri}: {what} failed after retries ({type(exc).__name__}: {exc})"
        if _is_full(exc):
            advice = "the store is full: free space, then rerun the same command"
        elif _is_unreachable(exc):
            advice = "the store cannot be reached: rerun the same command once it is back"
        else:
            advice = "the store refused it: check the credentials and permissions, then rerun the same command"
        return StorageError(f"{cause}; {advice}. Nothing partial was committed: the rerun resumes")


def _create_local(path: str):
    """Open a new local file for writing, creating its folders; a compaction may remove an empty folder between
    the two steps, so they are retried."""
    for attempt in range(5):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            return open(path, "wb")
        except FileNotFoundError:
            if attempt == 4:
                raise


def _is_full(exc: BaseException) -> bool:
    """Whether a storage failure means the store has no room (a full disk or quota), anywhere in its causes."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_unreachable(exc: BaseException) -> bool:
    """Whether a storage failure means the store could not be reached (as opposed to a refusal)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if isinstance(exc, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _content_version(data: bytes) -> str:
    import hashlib

    return hashlib.blake2b(data, digest_size=16).hexdigest()


def storage_error_in(exc: BaseException) -> StorageError | None:
    """The storage error (raised by Output with the output named) behind a Ray Data failure, if there is one.

    Ray Data wraps a failed stage in UserCodeException/RayTaskError; the driver can re-raise this cause so the
    job prints one line naming the output instead of a traceback.
    """
    first, seen, pending = exc, set(), [exc]
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, OSError) and str(exc).startswith("output "):
            return StorageError(str(exc))
        # A RayTaskError keeps the task's own exception in `cause`, apart from the Python chain.
        pending += [getattr(exc, "cause", None), exc.__cause__, exc.__context__]
    # A worker's exception chain does not survive pickling: Ray keeps it only as the text of its traceback.
    marker = f"{StorageError.__module__}.{StorageError.__name__}: "
    for line in str(first).splitlines():
        if line.startswith(marker) and line[len(marker):].startswith("output "):
            return StorageError(line[len(marker):])
    return None
