"""The output lease: one run at a time writes an output; a dead run's lease expires so the next one proceeds.

Taken by the driver before Ray starts, renewed by a heartbeat thread, released at the end. `OUT/lease.json`
names the holder (host, pid, run, start time) so a refused run can say who holds the output.

How it stays safe without a lock server:
- Taking a free output is a create-only write (S3 `If-None-Match: *`; a hard link locally). Two runs that start
  together cannot both succeed.
- Renewing, releasing and taking over an expired lease are compare-and-swap writes (S3 `If-Match` on the ETag
  read; locally a compare and rename under flock). A run whose heartbeat stalled past the expiry and was taken
  over learns it at its next renewal and stops before committing anything more.
- Expiry is judged by the store's clock (the lease object's modification time against a probe written now),
  so clock skew between hosts does not matter.
- A holder on this very machine (same boot and pid namespace) whose process is gone is dead at once: a run
  killed on a laptop does not make the next one wait for the expiry. Elsewhere only the expiry can tell.
Stores without conditional writes (some S3-compatible servers ignore `If-None-Match`) cannot give this
guarantee; docs/reliability.md says what is assumed there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from orchestrator.output.storage import Output, PreconditionFailed

logger = logging.getLogger("seedsift")
LEASE_FILE = "lease.json"
CLOCK_FILE = ".seedsift-clock"


class OutputBusy(Exception):
    """Another live run holds the output."""


class LeaseLost(Exception):
    """This run's lease was taken over (its heartbeat stalled past the expiry); it must stop writing."""


@dataclass(frozen=True)
class Holder:
    run: str
    host: str
    pid: int
    started: str  # UTC, ISO 8601
    seconds: float  # the lease expires this long after its last renewal
    machine: str = ""  # boot id and pid namespace: where `pid` means something
    pid_started: float = 0.0  # the holder process's start time, so a reused pid is not mistaken for it
    released: bool = False

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


# Runs of this process that hold a lease now: a lease left by a run of this same process that is no longer here
# (its release failed while the store was down) belongs to nobody, as a dead process's does.
_HELD_HERE: set[str] = set()


def _utc(seconds: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class Lease:
    RUN_ADVICE = "Let it finish, or rerun with --wait to start when it ends"

    def __init__(self, output: Output, seconds: float, busy_advice: str = RUN_ADVICE):
        self.output = output
        self.seconds = seconds
        self.busy_advice = busy_advice  # what a refused caller can do: a run can --wait, verify --repair cannot
        self.holder = Holder(run=uuid.uuid4().hex[:12], host=socket.gethostname(), pid=os.getpid(),
                             started=_utc(), seconds=seconds, machine=this_machine(),
                             pid_started=_process_start(os.getpid()))
        self._version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: LeaseLost | None = None

    # taking and giving back ---------------------------------------------------------------------------------

    def acquire(self, wait: bool = False, poll: float = 1.0) -> None:
        """Take the output, or raise OutputBusy naming the holder; with `wait`, poll until it is free."""
        announced = False
        while True:
            try:
                self._try_acquire()
                return
            except OutputBusy as busy:
                if not wait:
                    raise
                if not announced:
                    logger.warning("%s; waiting for it (--wait)", busy)
                    announced = True
                time.sleep(poll)

    def _try_acquire(self) -> None:
        data = self._encode(self.holder)
        while True:
            try:
                self.output.create_exclusive(LEASE_FILE, data)
                self._version = self.output.read_versioned(LEASE_FILE)[1]
                _HELD_HERE.add(self.holder.run)
                return
            except PreconditionFailed:
                pass
            try:
                current, version = self.output.read_versioned(LEASE_FILE)
                break
            except FileNotFoundError:  # released and deleted by hand between the two calls: try again
                continue
        holder = _decode(current)
        age = self._age()
        if holder is not None and not holder.released and age < holder.seconds and not _gone(holder):
            raise OutputBusy(
                f"output {self.output.uri} is in use by another run ({holder.describe()}; last renewed "
                f"{age:.0f} s ago, expires in {holder.seconds - age:.0f} s). {self.busy_advice}; if that run is dead, "
                "its lease expires on its own"
            )
        if holder is not None and not holder.released:
            why = "whose process is gone" if _gone(holder) else f"that stopped renewing it {age:.0f} s ago"
            logger.warning("taking over the lease of a run %s (%s)", why, holder.describe())
        try:
            self.output.replace_if_version(LEASE_FILE, data, version)
        except PreconditionFailed as exc:  # another run took it first
            holder = _decode(self.output.read_versioned(LEASE_FILE)[0])
            raise OutputBusy(f"output {self.output.uri} was just taken by another run "
                             f"({holder.describe() if holder else 'unknown'})") from exc
        self._version = self.output.read_versioned(LEASE_FILE)[1]
        _HELD_HERE.add(self.holder.run)

    def release(self) -> None:
        """Mark the lease free (kept as an object, so the next run takes it with a compare-and-swap)."""
        self.stop_heartbeat()
        _HELD_HERE.discard(self.holder.run)
        with self._lock:
            if self._version is None or self.lost:
                return
            try:
                self.output.replace_if_version(LEASE_FILE, self._encode(Holder(**{**asdict(self.holder),
                                                                                  "released": True})), self._version)
            except (PreconditionFailed, OSError) as exc:
                logger.warning("could not release the lease of %s (%s); it expires on its own", self.output.uri, exc)
            self._version = None

    # heartbeat -----------------------------------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="seedsift-lease", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                self.renew()
            except LeaseLost as exc:
                self.lost = exc
                logger.error("%s", exc)
                return
            except OSError as exc:  # the store is down: keep trying; the lease is safe until it expires
                logger.warning("lease renewal failed (%s); retrying", exc)

    def renew(self) -> None:
        with self._lock:
            if self._version is None:
                return
            try:
                self.output.replace_if_version(LEASE_FILE, self._encode(self.holder), self._version)
            except PreconditionFailed as exc:
                raise LeaseLost(f"output {self.output.uri}: another run took over this run's lease (its heartbeat "
                                "stalled past the expiry); stopping so that two runs never write one output") from exc
            self._version = self.output.read_versioned(LEASE_FILE)[1]

    def check(self) -> None:
        """Raise LeaseLost if the heartbeat found the lease taken over (called by the driver between batches)."""
        if self.lost is not None:
            raise self.lost

    # helpers -------------------------------------------------------------------------------------------------

    def _encode(self, holder: Holder) -> bytes:
        # The nonce makes every write's bytes (and so its ETag) differ from the previous one.
        return json.dumps({**asdict(holder), "renewed": _utc(), "nonce": uuid.uuid4().hex[:8]}, indent=2).encode()

    def _age(self) -> float:
        """Seconds since the lease object was last written, by the store's clock."""
        if self.output.is_local:
            return time.time() - self.output.modified(LEASE_FILE)
        self.output.write_bytes(CLOCK_FILE, b"now")
        return self.output.modified(CLOCK_FILE) - self.output.modified(LEASE_FILE)


def this_machine() -> str:
    """This kernel boot and pid namespace: two processes that share it can check each other's pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""  # not Linux: never judge a holder by its pid


def _process_start(pid: int) -> float:
    """When a live process started; 0.0 for none, and for a zombie: a killed process its parent has not reaped yet
    (seconds usually, for ever under a container init that never reaps) runs nothing and holds nothing."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return 0.0
        return process.create_time()
    except psutil.Error:
        return 0.0


def _gone(holder: Holder) -> bool:
    """Whether the holder ran on this machine and its process no longer exists."""
    if not holder.machine or holder.machine != this_machine():
        return False
    if holder.pid == os.getpid() and holder.pid_started == _process_start(os.getpid()):
        return holder.run not in _HELD_HERE  # this process: gone if none of its runs holds the lease now
    return _process_start(holder.pid) != holder.pid_started


def _decode(data: bytes) -> Holder | None:
    try:
        values = json.loads(data)
        return Holder(**{k: values[k] for k in Holder.__dataclass_fields__ if k in values})
    except (ValueError, TypeError, KeyError):
        return None  # unreadable: treated as expired, so a damaged lease never blocks an output for ever


def read_holder(output: Output) -> Holder | None:
    try:
        return _decode(output.read_bytes(LEASE_FILE))
    except FileNotFoundError:
        return None
