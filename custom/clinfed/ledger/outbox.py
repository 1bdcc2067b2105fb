"""Durable outbox: ledger writes survive an unreachable ledger and a process restart.

Every write first goes to an append-only JSON-lines journal, fsynced before the write is
attempted, and is delivered to the ledger strictly in journal order. A line marks each entry
done. Delivery is idempotent because the contract refuses a record that already exists: when a
retried write comes back ``DUPLICATE`` (the earlier attempt committed but its answer was lost),
the entry counts as delivered, so nothing is recorded twice. A write the contract refuses for
any other reason (``CONFLICT``, ``ACCESS_DENIED`` ...) can never succeed; it is marked rejected,
logged, and kept in the journal for the operator, and delivery goes on with the next entry.

Policies (per job):

* ``async`` (default): the write is journalled and the caller goes on; a background thread
  delivers it, retrying every ``retry_interval`` seconds while the ledger is unreachable.
* ``strict``: the caller waits until its write (and everything queued before it) is committed;
  after ``strict_timeout`` seconds it gets :class:`~clinfed.ledger.errors.LedgerUnavailable`,
  and the entry stays queued for later delivery. A refusal is raised to the caller.

The journal may be shared by threads and processes: appends and deliveries hold an exclusive
``flock`` on ``<journal>.lock``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from .base import ContractLedger
from .errors import DuplicateRecord, LedgerError, LedgerRejected, LedgerUnavailable

log = logging.getLogger(__name__)

POLICIES = ("async", "strict")


@dataclasses.dataclass
class OutboxEntry:
    seq: int
    function: str
    args: list
    # outcome once delivered: committed | duplicate | rejected
    outcome: str | None = None
    detail: str = ""
    # False only for an entry this process appended and has not tried yet: a DUPLICATE on the
    # first try is the caller's own duplicate, not a retry of ours.
    attempted: bool = True


def _checksum(body: dict) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Outbox:
    """The journal file. Lines are ``{"put": ...}`` entries and ``{"done": seq, ...}`` marks."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._thread_lock = threading.RLock()
        self._entries: dict[int, OutboxEntry] = {}
        self._offset = 0
        self._inode = None
        self._depth = 0
        self._max_seq = 0
        self.torn_lines = 0

    # ------------------------------------------------------------------ locking and reading

    @contextlib.contextmanager
    def locked(self) -> Iterator["Outbox"]:
        """Exclusive access for this thread and process; re-entrant within one thread."""
        with self._thread_lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            with open(self._lock_path, "a+") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                self._depth = 1
                try:
                    self._refresh()
                    yield self
                finally:
                    self._depth = 0
                    fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _refresh(self) -> None:
        """Read what other processes appended since our last look (all of it after a compaction)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._entries, self._offset, self._inode = {}, 0, None
            return
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self._entries, self._offset, self._inode = {}, 0, stat.st_ino
        if stat.st_size == self._offset:
            return
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        complete = data.rfind(b"\n") + 1  # a torn last line (crash mid-append) is not read
        for line in data[:complete].splitlines():
            self._apply(line)
        self._offset += complete

    def _apply(self, line: bytes) -> None:
        try:
            record = json.loads(line)
            body = {k: v for k, v in record.items() if k != "crc"}
            if record.get("crc") != _checksum(body):
                raise ValueError("checksum mismatch")
        except ValueError:
            self.torn_lines += 1
            log.warning("%s: skipping a damaged outbox line", self.path)
            return
        if "put" in record:
            seq = record["put"]
            self._entries[seq] = OutboxEntry(seq=seq, function=record["function"], args=record["args"])
        elif "done" in record and record["done"] in self._entries:
            entry = self._entries[record["done"]]
            entry.outcome, entry.detail = record["outcome"], record.get("detail", "")

    def _append_line(self, body: dict) -> None:
        line = json.dumps(dict(body, crc=_checksum(body)), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8") + b"\n"
        new_file = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size > self._offset:  # the tail is a torn line: start ours on a fresh one
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
            self._inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        if new_file:
            _fsync_dir(self.path.parent)
        self._offset = size + len(line)
        self._apply(line.strip())

    # ------------------------------------------------------------------ API

    def append(self, function: str, args) -> OutboxEntry:
        """Journal a write durably; returns its entry (``seq`` orders delivery)."""
        with self.locked():
            # never reuse a number in this process, even after compaction emptied the journal
            seq = max(max(self._entries, default=0), self._max_seq) + 1
            self._max_seq = seq
            self._append_line({"put": seq, "function": function, "args": [str(a) for a in args]})
            entry = self._entries[seq]
            entry.attempted = False
            return entry

    def mark(self, entry: OutboxEntry, outcome: str, detail: str = "") -> None:
        with self.locked():
            self._append_line({"done": entry.seq, "outcome": outcome, "detail": detail[:2000]})
            entry.outcome, entry.detail = outcome, detail

    def pending(self) -> list[OutboxEntry]:
        with self.locked():
            return [e for _, e in sorted(self._entries.items()) if e.outcome is None]

    def entries(self) -> list[OutboxEntry]:
        with self.locked():
            return [e for _, e in sorted(self._entries.items())]

    def get(self, seq: int) -> OutboxEntry | None:
        with self.locked():
            return self._entries.get(seq)

    def compact(self) -> None:
        """Drop delivered entries from the journal (rejected ones are kept for the operator)."""
        with self.locked():
            keep = [e for _, e in sorted(self._entries.items()) if e.outcome in (None, "rejected")]
            if len(keep) == len(self._entries):
                return
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as handle:
                for e in keep:
                    put = {"put": e.seq, "function": e.function, "args": e.args}
                    handle.write(json.dumps(dict(put, crc=_checksum(put)), sort_keys=True,
                                            separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n")
                    if e.outcome:
                        done = {"done": e.seq, "outcome": e.outcome, "detail": e.detail}
                        handle.write(json.dumps(dict(done, crc=_checksum(done)), sort_keys=True,
                                                separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
            self._entries, self._offset, self._inode = {}, 0, None
            self._refresh()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutboxLedger(ContractLedger):
    """A ledger whose writes go through a durable outbox; reads go straight to ``backend``.

    Args:
        backend: the ledger to deliver to (LocalLedger or FabricLedger).
        path: the journal file; keep one per process identity (e.g. per site).
        policy: ``async`` (default) or ``strict`` (see the module docstring).
        retry_interval: seconds between delivery attempts while the ledger is unreachable.
        strict_timeout: in ``strict``, seconds a write may wait before LedgerUnavailable.
        background: deliver from a background thread (``async``); off, call :meth:`flush`.
        on_rejected: called with (entry, error) when the contract refuses a queued write.
    """

    def __init__(self, backend: ContractLedger, path: str | os.PathLike, *, policy: str = "async",
                 retry_interval: float = 5.0, strict_timeout: float = 120.0, background: bool = True,
                 on_rejected: Callable[[OutboxEntry, LedgerRejected], None] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"ledger outbox policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.backend = backend
        self.msp_id = backend.msp_id
        self.outbox = Outbox(path)
        self.policy = policy
        self.retry_interval = retry_interval
        self.strict_timeout = strict_timeout
        self.on_rejected = on_rejected
        self._results: dict[int, str | None] = {}
        self._errors: dict[int, LedgerRejected] = {}
        self._deliver_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        if background and policy == "async":
            self._thread = threading.Thread(target=self._run, name="clinfed-ledger-outbox", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ Ledger

    def submit(self, function: str, *args: str) -> str | None:
        entry = self.outbox.append(function, args)
        if self.policy == "async":
            self._wake.set()
            return None
        deadline = time.monotonic() + self.strict_timeout
        while True:
            self.flush()
            if entry.outcome is not None:
                error = self._errors.pop(entry.seq, None)
                if error is not None:
                    raise error
                return self._results.pop(entry.seq, None)
            if time.monotonic() >= deadline:
                raise LedgerUnavailable(
                    f"{function} was not committed within {self.strict_timeout:.0f} s (ledger unreachable); "
                    f"it stays queued in {self.outbox.path} as entry {entry.seq}")
            time.sleep(min(self.retry_interval, max(0.0, deadline - time.monotonic())))

    def evaluate(self, function: str, *args: str) -> str:
        return self.backend.evaluate(function, *args)

    def events(self, start_block: int = 0, follow: bool = False, timeout: float | None = None):
        return self.backend.events(start_block, follow=follow, timeout=timeout)

    # ------------------------------------------------------------------ delivery

    def pending(self) -> int:
        return len(self.outbox.pending())

    def flush(self) -> int:
        """Deliver queued writes in order until done or the ledger is unreachable; returns how many
        are still queued.

        The journal lock is held only to read and mark entries, never while talking to the ledger,
        so an ``async`` caller is not held up by a slow or hanging ledger.
        """
        with self._deliver_lock:
            while True:
                pending = self.outbox.pending()
                if not pending:
                    break
                entry = pending[0]
                if not self._deliver(entry):
                    break
            if self.policy == "async":  # nobody waits for these
                self._results.clear()
                self._errors.clear()
            with self.outbox.locked():
                remaining = len(self.outbox.pending())
                if remaining == 0:
                    self.outbox.compact()
            return remaining

    def _deliver(self, entry: OutboxEntry) -> bool:
        """Send one entry; False when the ledger could not be reached (the entry stays queued)."""
        first_try = not entry.attempted
        entry.attempted = True
        try:
            result = self.backend.submit(entry.function, *entry.args)
        except DuplicateRecord as exc:
            self.outbox.mark(entry, "duplicate", str(exc))
            if first_try and self.policy == "strict":
                self._errors[entry.seq] = exc  # the caller's own repeat, not a retry of ours
            else:
                log.info("ledger outbox: %s entry %d was already committed", entry.function, entry.seq)
                self._results[entry.seq] = None
        except LedgerRejected as exc:
            self.outbox.mark(entry, "rejected", str(exc))
            log.error("ledger outbox: %s entry %d refused by the contract: %s", entry.function, entry.seq, exc)
            self._errors[entry.seq] = exc
            if self.on_rejected is not None:
                self.on_rejected(entry, exc)
        except (LedgerError, OSError) as exc:
            log.warning("ledger outbox: ledger unreachable, %d write(s) queued in %s (%s)",
                        len(self.outbox.pending()), self.outbox.path, exc)
            return False
        else:
            self.outbox.mark(entry, "committed")
            self._results[entry.seq] = result
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                remaining = self.flush()
            except Exception:  # noqa: BLE001 - the delivery thread must survive anything
                log.exception("ledger outbox: delivery failed")
                remaining = 1
            self._wake.wait(self.retry_interval if remaining else None)
            self._wake.clear()

    def close(self, timeout: float = 10.0) -> int:
        """Stop the delivery thread after a last attempt; returns how many writes stay queued."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            remaining = self.flush()
        except Exception:  # noqa: BLE001
            remaining = self.pending()
        if remaining:
            log.warning("ledger outbox: %d write(s) stay queued in %s for the next run", remaining, self.outbox.path)
        self.backend.close()
        return remaining
