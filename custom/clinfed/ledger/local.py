"""LocalLedger: the clinfed contract hosted in-process over a durable SQLite file.

The contract code is the one peers run (``clinfed_chaincode``). Each call builds a real Fabric
proposal (nonce, creator, tx_id, header timestamp) for the caller's MSP ID and hands it to
fabric-chaincode-python's own ``ChaincodeStub``, whose peer side is answered here from SQLite.
So the contract decodes its caller and time exactly as it does on a peer, and its access rules
are exercised for whichever MSP ID the ledger is opened as.

What a peer would keep is kept: world state, the history of every key, one block per committed
transaction (tx_id, creator, function, header time) and the transaction's chaincode event.
Like Fabric, reads inside a transaction see committed state only, and a refused transaction
leaves nothing behind.

Several processes (a FLARE server and its clients) may use one file at once: every write
transaction runs under SQLite's write lock (``BEGIN IMMEDIATE``), so transactions are applied
one after another, and each commit is fsynced (WAL, ``synchronous=FULL``).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

from fabric_protos.ledger.queryresult import kv_query_result_pb2
from fabric_protos.peer import chaincode_pb2, chaincode_shim_pb2, proposal_pb2

from .base import CONTRACT, ContractLedger
from .errors import LedgerError, LedgerUnavailable, rejection_from_message
from .identity import Identity
from .proposal import build_proposal
from .records import LedgerEvent

SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    number INTEGER PRIMARY KEY, tx_id TEXT NOT NULL UNIQUE, creator_msp TEXT NOT NULL,
    function TEXT NOT NULL, ts_seconds INTEGER NOT NULL, ts_nanos INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (key BLOB PRIMARY KEY, value BLOB NOT NULL, block INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    block INTEGER NOT NULL, key BLOB NOT NULL, value BLOB, is_delete INTEGER NOT NULL,
    PRIMARY KEY (key, block));
CREATE TABLE IF NOT EXISTS events (
    block INTEGER PRIMARY KEY, tx_id TEXT NOT NULL, chaincode TEXT NOT NULL, name TEXT NOT NULL,
    payload BLOB NOT NULL);
"""


@functools.lru_cache(maxsize=1)
def _chaincode():
    from clinfed_chaincode import new_chaincode

    return new_chaincode()


def _run(coroutine):
    """Run a coroutine that never suspends (our handler answers at once) without an event loop.

    This keeps LocalLedger usable from any thread, including one inside a running event loop.
    """
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise LedgerError("the chaincode waited on something LocalLedger does not provide")


class _PeerSide:
    """The peer's half of the shim protocol, as the ``client`` a ``ChaincodeStub`` talks to.

    Reads come from committed state in the open SQLite transaction; writes are buffered until the
    transaction is accepted.
    """

    def __init__(self, conn: sqlite3.Connection, chaincode: str):
        self._conn = conn
        self._chaincode = chaincode
        self.writes: dict[str, bytes | None] = {}

    @staticmethod
    def _reply(response: chaincode_shim_pb2.QueryResponse):
        return SimpleNamespace(payload=response.SerializeToString())

    async def handle_get_state(self, collection, key, channel_id, tx_id):
        self._public_only(collection)
        row = self._conn.execute("SELECT value FROM state WHERE key = ?", (key.encode("utf-8"),)).fetchone()
        return bytes(row[0]) if row else b""

    async def handle_put_state(self, collection, key, value, channel_id, tx_id):
        self._public_only(collection)
        if not key:
            raise LedgerError("the chaincode wrote an empty key")
        self.writes[key] = bytes(value)
        return SimpleNamespace(payload=b"")

    async def handle_delete_state(self, collection, key, channel_id, tx_id):
        self._public_only(collection)
        self.writes[key] = None
        return SimpleNamespace(payload=b"")

    async def handle_get_state_by_range(self, collection, start_key, end_key, channel_id, tx_id, metadata=None):
        self._public_only(collection)
        sql, params = "SELECT key, value FROM state WHERE key >= ?", [start_key.encode("utf-8")]
        if end_key:
            sql += " AND key < ?"
            params.append(end_key.encode("utf-8"))
        response = chaincode_shim_pb2.QueryResponse(has_more=False, id=tx_id)
        for key, value in self._conn.execute(sql + " ORDER BY key", params):
            kv = kv_query_result_pb2.KV(namespace=self._chaincode, key=bytes(key).decode("utf-8"), value=bytes(value))
            response.results.add(resultBytes=kv.SerializeToString())
        return self._reply(response)

    async def handle_get_history_for_key(self, key, channel_id, tx_id):
        response = chaincode_shim_pb2.QueryResponse(has_more=False, id=tx_id)
        rows = self._conn.execute(
            "SELECT b.tx_id, h.value, h.is_delete, b.ts_seconds, b.ts_nanos FROM history h "
            "JOIN blocks b ON b.number = h.block WHERE h.key = ? ORDER BY h.block DESC",  # newest first, as Fabric 2.x
            (key.encode("utf-8"),))
        for tx, value, is_delete, seconds, nanos in rows:
            mod = kv_query_result_pb2.KeyModification(tx_id=tx, value=bytes(value or b""), is_delete=bool(is_delete))
            mod.timestamp.seconds, mod.timestamp.nanos = seconds, nanos
            response.results.add(resultBytes=mod.SerializeToString())
        return self._reply(response)

    async def handle_query_state_next(self, query_id, channel_id, tx_id):
        return self._reply(chaincode_shim_pb2.QueryResponse(has_more=False, id=query_id))

    async def handle_query_state_close(self, query_id, channel_id, tx_id):
        return SimpleNamespace(payload=b"")

    async def handle_get_query_result(self, *args, **kwargs):
        raise LedgerError("rich (CouchDB) queries are not available; the contract uses key-range queries only")

    async def handle_invoke_chaincode(self, *args, **kwargs):
        raise LedgerError("chaincode-to-chaincode calls are not available in LocalLedger")

    @staticmethod
    def _public_only(collection):
        if collection:
            raise LedgerError("private data collections are not available in LocalLedger")


class LocalLedger(ContractLedger):
    """The embedded ledger, opened as one caller.

    Args:
        path: the SQLite file; created (with its folder) if missing. Share it between processes
            on one machine to share the ledger.
        msp_id: the MSP ID every transaction of this instance is sent as; the contract's access
            rules apply to it.
        channel: channel name put in proposals.
        chaincode: chaincode name; events carry it.
        clock: seconds since the epoch for the transaction header (the only time the contract sees).
        busy_timeout: seconds to wait for another process's write transaction before giving up
            with :class:`LedgerUnavailable`.
        identity: a full identity (MSP ID + certificate) instead of ``msp_id`` alone.
    """

    def __init__(self, path: str | os.PathLike, msp_id: str | None = None, *, channel: str = "clinfed",
                 chaincode: str = "clinfed", clock: Callable[[], float] = time.time, busy_timeout: float = 30.0,
                 identity: Identity | None = None):
        if identity is None:
            if not msp_id:
                raise ValueError("LocalLedger needs the caller's msp_id (or an identity)")
            identity = Identity(msp_id=msp_id, certificate_pem=b"")
        self.identity = identity
        self.msp_id = identity.msp_id
        self.path = Path(path)
        self.channel = channel
        self.chaincode = chaincode
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = None

    def __repr__(self):
        return f"LocalLedger({str(self.path)!r}, msp_id={self.msp_id!r})"

    def as_msp(self, msp_id: str) -> "LocalLedger":
        """The same ledger file opened as another caller (handy for tests and tools)."""
        return LocalLedger(self.path, msp_id, channel=self.channel, chaincode=self.chaincode, clock=self._clock,
                           busy_timeout=self._busy_timeout)

    # ------------------------------------------------------------------ connection

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        conn = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), timeout=self._busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            deadline = time.monotonic() + self._busy_timeout
            while True:
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            conn.execute("PRAGMA synchronous=FULL")
            schema = self._schema_version(conn)
            if schema is None:
                conn.execute("BEGIN IMMEDIATE")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('channel', ?)",
                             (SCHEMA_VERSION, self.channel))
                conn.execute("COMMIT")
                schema = self._schema_version(conn)
            if schema != SCHEMA_VERSION:
                raise LedgerError(f"{self.path}: ledger schema {schema} is not the supported {SCHEMA_VERSION}")
        except sqlite3.OperationalError as exc:
            if conn is not None:
                conn.close()
            raise LedgerUnavailable(f"{self.path}: cannot open the local ledger ({exc})") from exc
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            raise LedgerError(f"{self.path}: not a clinfed ledger or damaged ({exc})") from exc
        self._conn, self._pid = conn, os.getpid()
        return conn

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> str | None:
        try:
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        return row[0] if row else None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------ transactions

    def submit(self, function: str, *args: str) -> str:
        return self._invoke(function, args, commit=True)

    def evaluate(self, function: str, *args: str) -> str:
        return self._invoke(function, args, commit=False)

    def _invoke(self, function: str, args, commit: bool) -> str:
        from clinfed_chaincode._shim import ChaincodeStub

        built = build_proposal(creator=self.identity.creator, channel=self.channel, chaincode=self.chaincode,
                               function=f"{CONTRACT}:{function}", args=args, clock=self._clock)
        signed = proposal_pb2.SignedProposal(proposal_bytes=built.proposal_bytes)
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE" if commit else "BEGIN")
            except sqlite3.OperationalError as exc:
                raise LedgerUnavailable(f"{self.path}: the local ledger is busy or unreadable ({exc})") from exc
            try:
                peer = _PeerSide(conn, self.chaincode)
                stub = ChaincodeStub(peer, self.channel, built.tx_id,
                                     chaincode_pb2.ChaincodeInput(args=list(built.args)), signed)
                response = _run(_chaincode().invoke(stub))
                if response.status >= 400:
                    raise rejection_from_message(response.message)
                if commit:
                    self._commit(conn, built.tx_id, function, stub, peer)
                    conn.execute("COMMIT")
                else:
                    conn.execute("ROLLBACK")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise LedgerUnavailable(f"{self.path}: could not commit to the local ledger ({exc})") from exc
                raise
        return response.payload.decode("utf-8")

    def _commit(self, conn, tx_id, function, stub, peer: _PeerSide) -> None:
        stamp = stub.get_tx_timestamp()
        block = conn.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM blocks").fetchone()[0]
        conn.execute("INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?)",
                     (block, tx_id, self.msp_id, function, stamp.seconds, stamp.nanos))
        for key, value in peer.writes.items():
            raw_key = key.encode("utf-8")
            if value is None:
                conn.execute("DELETE FROM state WHERE key = ?", (raw_key,))
            else:
                conn.execute("INSERT OR REPLACE INTO state VALUES (?, ?, ?)", (raw_key, value, block))
            conn.execute("INSERT INTO history VALUES (?, ?, ?, ?)", (block, raw_key, value, value is None))
        events = stub.get_events()
        if events:  # Fabric keeps one event per transaction: the last one set
            event = events[-1]
            conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                         (block, tx_id, self.chaincode, event.event_name, bytes(event.payload)))

    # ------------------------------------------------------------------ events and size

    def events(self, start_block: int = 0, follow: bool = False, timeout: float | None = None,
               poll_interval: float = 0.2) -> Iterator[LedgerEvent]:
        """Chaincode events from ``start_block`` on, in commit order.

        Without ``follow`` it stops at the current end; with it, it waits for new ones until
        ``timeout`` seconds pass without one (forever if ``None``).
        """
        next_block = start_block
        idle_since = time.monotonic()
        while True:
            with self._lock:
                rows = self._connection().execute(
                    "SELECT block, tx_id, name, payload FROM events WHERE block >= ? ORDER BY block LIMIT 500",
                    (next_block,)).fetchall()
            for block, tx_id, name, payload in rows:
                yield LedgerEvent.from_bytes(block, tx_id, name, bytes(payload))
                next_block = block + 1
            if rows:
                idle_since = time.monotonic()
                continue
            if not follow or (timeout is not None and time.monotonic() - idle_since >= timeout):
                return
            time.sleep(poll_interval)

    def height(self) -> int:
        """Number of committed transactions (one per block here)."""
        with self._lock:
            return self._connection().execute("SELECT COALESCE(MAX(number), 0) FROM blocks").fetchone()[0]

    def block_of(self, tx_id: str) -> dict | None:
        """The committed transaction ``tx_id``: block number, creator MSP, function and header time."""
        with self._lock:
            row = self._connection().execute(
                "SELECT number, creator_msp, function, ts_seconds, ts_nanos FROM blocks WHERE tx_id = ?",
                (tx_id,)).fetchone()
        if row is None:
            return None
        return {"block": row[0], "creator_msp": row[1], "function": row[2], "ts_seconds": row[3], "ts_nanos": row[4]}
