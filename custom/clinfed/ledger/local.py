"""LocalLedger: the clinfed contract hosted in-process over a hash-chained, signed SQLite block store.

The contract code is the one peers run (``clinfed_chaincode``). Each call builds a real Fabric
proposal (nonce, creator, tx_id, header timestamp), signs it with the caller's key, and hands it
to fabric-chaincode-python's own ``ChaincodeStub`` after the checks a peer makes:

* the creator's certificate was issued by a CA of the consortium and is a member of the MSP ID it
  claims (the genesis block's :class:`~clinfed.ledger.pki.Membership`);
* the request's signature verifies with that certificate, and ``tx_id`` is sha256(nonce + creator);
* a write's tx_id was never committed before (a replayed request is refused);
* the contract itself refuses a header time more than ``MAX_CLOCK_SKEW`` from this node's clock.

The file holds blocks only. Block 0 (genesis) holds the channel configuration (membership,
channel and chaincode names), signed by whoever created the ledger. Block n holds one signed
proposal and a header ``{number, previous_hash, tx_id, proposal_sha256, proposal_signature,
results_sha256, committed_at}``, signed by the transaction's creator; its hash, sha256 of the
header, is the next block's ``previous_hash``. The world state, the history of each key and the
events are not stored: every open replays the chain from the genesis block, checking each
block's link, signatures and membership, and re-running its transaction through the contract,
whose writes, event and answer must hash to the block's ``results_sha256``. So an edited row, a
deleted block, random corruption or a write the contract would have refused is found on open,
with the block number, and nothing from that block on is used. A participant keeps the last head
it saw in its own ``head_file``: a ledger that lost blocks, or was rewritten from the genesis
block on, no longer holds that head, and is refused.

Several processes (a FLARE server and its clients) may use one file at once: every write runs
under SQLite's write lock (``BEGIN IMMEDIATE``) after catching up with blocks other processes
appended, and each commit is fsynced (WAL, ``synchronous=FULL``). Like Fabric, a refused
transaction leaves nothing behind.
"""

from __future__ import annotations

import base64
import bisect
import datetime as _dt
import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

from fabric_protos.common import common_pb2
from fabric_protos.ledger.queryresult import kv_query_result_pb2
from fabric_protos.msp import identities_pb2
from fabric_protos.peer import chaincode_pb2, chaincode_shim_pb2, proposal_pb2

from clinfed_chaincode import canonical_json

from .base import CONTRACT, ContractLedger
from .errors import (IdentityRejected, LedgerError, LedgerNotFound, LedgerTampered, LedgerUnavailable,
                     ReplayedRequest, rejection_from_message)
from .identity import SigningIdentity, signature_valid
from .pki import Membership, simulation_identity_files, simulation_participants
from .proposal import build_proposal, transaction_id
from .records import LedgerEvent

SCHEMA_VERSION = "2"
_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE blocks (number INTEGER PRIMARY KEY, header BLOB NOT NULL, proposal BLOB NOT NULL,
                     signature BLOB NOT NULL);
"""
_RESPONSE_OK = 400  # fabric: status below this is success


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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


@dataclass
class _Request:
    """A signed proposal, decoded and authenticated."""

    signed: proposal_pb2.SignedProposal
    tx_id: str
    msp_id: str
    creator: bytes
    certificate: object
    args: list
    seconds: int
    nanos: int

    @property
    def function(self) -> str:
        name = self.args[0].decode("utf-8", "replace") if self.args else ""
        return name.split(":", 1)[-1]


@dataclass
class _Replica:
    """The state every open rebuilds from the verified chain."""

    membership: Membership | None = None
    channel: str = ""
    chaincode: str = ""
    hashes: list = field(default_factory=list)  # block number -> hash (hex)
    state: dict = field(default_factory=dict)  # key -> value bytes
    keys: list = field(default_factory=list)  # sorted state keys
    history: dict = field(default_factory=dict)  # key -> [(block, tx_id, value|None, seconds, nanos)]
    events: list = field(default_factory=list)  # LedgerEvent, in block order
    tx_blocks: dict = field(default_factory=dict)  # tx_id -> block number
    blocks: dict = field(default_factory=dict)  # block number -> (creator MSP, function, seconds, nanos)

    @property
    def height(self) -> int:
        return len(self.hashes)

    def apply(self, block: int, tx_id: str, seconds: int, nanos: int, writes: dict) -> None:
        for key, value in writes.items():
            if value is None:
                if key in self.state:
                    del self.state[key]
                    self.keys.pop(bisect.bisect_left(self.keys, key))
            else:
                if key not in self.state:
                    bisect.insort(self.keys, key)
                self.state[key] = value
            self.history.setdefault(key, []).append((block, tx_id, value, seconds, nanos))


class _PeerSide:
    """The peer's half of the shim protocol, as the ``client`` a ``ChaincodeStub`` talks to.

    Reads come from the replica's committed state; writes are buffered until the transaction is
    accepted, as on a peer.
    """

    def __init__(self, replica: _Replica, chaincode: str):
        self._replica = replica
        self._chaincode = chaincode
        self.writes: dict[str, bytes | None] = {}

    @staticmethod
    def _reply(response: chaincode_shim_pb2.QueryResponse):
        return SimpleNamespace(payload=response.SerializeToString())

    async def handle_get_state(self, collection, key, channel_id, tx_id):
        self._public_only(collection)
        return self._replica.state.get(key, b"")

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
        keys = self._replica.keys
        first = bisect.bisect_left(keys, start_key)
        last = bisect.bisect_left(keys, end_key) if end_key else len(keys)
        if metadata:  # a paginated query returns at most page_size records, as Fabric does
            page = chaincode_shim_pb2.QueryMetadata.FromString(metadata)
            if page.pageSize > 0:
                last = min(last, first + page.pageSize)
        response = chaincode_shim_pb2.QueryResponse(has_more=False, id=tx_id)
        for key in keys[first:last]:
            kv = kv_query_result_pb2.KV(namespace=self._chaincode, key=key, value=self._replica.state[key])
            response.results.add(resultBytes=kv.SerializeToString())
        return self._reply(response)

    async def handle_get_history_for_key(self, key, channel_id, tx_id):
        response = chaincode_shim_pb2.QueryResponse(has_more=False, id=tx_id)
        for _, tx, value, seconds, nanos in reversed(self._replica.history.get(key, [])):  # newest first
            mod = kv_query_result_pb2.KeyModification(tx_id=tx, value=value or b"", is_delete=value is None)
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
    """The embedded ledger, opened as one signing participant.

    Args:
        path: the SQLite file. It must exist: :meth:`create` makes a new ledger. Share it between
            processes on one machine to share the ledger.
        msp_id: with no ``identity``, the MSP ID whose simulator identity (beside the file, see
            :mod:`clinfed.ledger.pki`) signs.
        identity: the participant's certificate and key; every transaction is signed with it.
        trusted_ca: PEM of the CA the participant trusts (its own kit's ``rootCA.pem``); the ledger's
            genesis block must list it, so a ledger made under another CA is refused.
        head_file: where this participant keeps the last head it saw (see the module docstring).
        channel, chaincode: names the proposals carry; must match the genesis block's.
        clock: seconds since the epoch for the proposal header (the submitter's clock).
        node_clock: this node's clock, against which the contract checks the header time.
        busy_timeout: seconds to wait for another process's write transaction before giving up
            with :class:`LedgerUnavailable`.
    """

    def __init__(self, path: str | os.PathLike, msp_id: str | None = None, *, identity: SigningIdentity | None = None,
                 trusted_ca: bytes | None = None, head_file: str | os.PathLike | None = None,
                 channel: str = "clinfed", chaincode: str = "clinfed", clock: Callable[[], float] = time.time,
                 node_clock: Callable[[], float] = time.time, busy_timeout: float = 30.0):
        self.path = Path(path)
        if not self.path.is_file():
            raise LedgerNotFound(f"{self.path}: no ledger file here; a ledger is created only by "
                                 f"`clinfed consortium provision` (or the demo): check the path")
        if identity is None:
            identity, trusted_ca, head_file = self._simulation_identity(msp_id)
        elif msp_id is not None and msp_id != identity.msp_id:
            raise ValueError(f"msp_id {msp_id} differs from the identity's {identity.msp_id}")
        self.identity = identity
        self.msp_id = identity.msp_id
        self.trusted_ca = trusted_ca
        self.head_file = Path(head_file) if head_file else None
        self.channel = channel
        self.chaincode = chaincode
        self._clock = clock
        self._node_clock = node_clock
        self._busy_timeout = busy_timeout
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = None
        self._replica = _Replica()
        self._tx_time = 0.0  # the node time the contract sees during one transaction
        from clinfed_chaincode import new_chaincode

        self._chaincode = new_chaincode(clock=lambda: self._tx_time)

    def __repr__(self):
        return f"LocalLedger({str(self.path)!r}, msp_id={self.msp_id!r})"

    def _simulation_identity(self, msp_id: str | None):
        if not msp_id:
            raise ValueError("LocalLedger needs the caller's identity (or, in a simulator, its msp_id)")
        participants = simulation_participants(self.path) or {}
        participant = next((name for name, msp in participants.items() if msp == msp_id), None)
        files = simulation_identity_files(self.path, participant) if participant else None
        if files is None:
            raise IdentityRejected(f"no credential for {msp_id} on {self.path}: a participant signs with its own "
                                   f"key (its startup kit, named in its site configuration's ledger section)")
        return files.load(msp_id), files.ca_pem(), files.head_file

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(cls, path: str | os.PathLike, identity: SigningIdentity, membership: Membership, *,
               channel: str = "clinfed", chaincode: str = "clinfed", **kwargs) -> "LocalLedger":
        """Make a new ledger file whose genesis block holds ``membership``, signed by ``identity``
        (which must be a member). Refuses to overwrite an existing file."""
        path = Path(path)
        if path.exists():
            raise LedgerError(f"{path}: a ledger already exists here; it is never overwritten")
        now = time.time()
        membership.authenticate(identity.msp_id, identity.certificate_pem, _utc(now))
        header = canonical_json({"number": 0, "previous_hash": "", "committed_at": now,
                                 "config": {"channel": channel, "chaincode": chaincode,
                                            "membership": membership.to_json()},
                                 "signer": _b64(identity.creator)}).encode("utf-8")
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), isolation_level=None)  # creates the file
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            conn.execute("INSERT INTO blocks VALUES (0, ?, ?, ?)", (header, b"", identity.sign(header)))
            conn.execute("COMMIT")
        finally:
            conn.close()
        return cls(path, identity=identity, trusted_ca=membership.ca_certificates[0], channel=channel,
                   chaincode=chaincode, **kwargs)

    # ------------------------------------------------------------------ connection and verification

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        if not self.path.is_file():
            raise LedgerNotFound(f"{self.path}: the ledger file is gone")
        conn = None
        try:
            conn = sqlite3.connect(str(self.path), timeout=self._busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            deadline = time.monotonic() + self._busy_timeout
            while True:
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            conn.execute("PRAGMA synchronous=FULL")
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            schema = row[0] if row else None
            if schema != SCHEMA_VERSION:
                raise LedgerError(f"{self.path}: ledger schema {schema} is not the supported {SCHEMA_VERSION} "
                                  f"(a ledger from an older clinfed: provision a new one)")
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise LedgerUnavailable(f"{self.path}: cannot open the local ledger ({exc})") from exc
            with open(self.path, "rb") as handle:
                if handle.read(16) != b"SQLite format 3\0":
                    raise LedgerError(f"{self.path}: not a clinfed ledger (not an SQLite file)") from exc
            raise LedgerTampered(self.path, self._first_unreadable_block(), f"the file cannot be read ({exc})") from exc
        except LedgerError:
            conn.close()
            raise
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _first_unreadable_block(self) -> int:
        """For a file SQLite cannot open normally: the first block that cannot be read on its own."""
        number = 0
        try:
            with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as conn:
                while conn.execute("SELECT number FROM blocks WHERE number = ?", (number,)).fetchone():
                    number += 1
        except sqlite3.DatabaseError:
            pass
        return number

    def verify(self) -> int:
        """Replay and check every block not yet verified (all of them on first use); returns the
        height. Raises :class:`LedgerTampered` naming the first block that fails."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN")
                self._catch_up(conn)
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            return self._replica.height

    def _catch_up(self, conn: sqlite3.Connection) -> None:
        replica = self._replica
        before = replica.height
        expected = replica.height
        cursor = conn.execute("SELECT number, header, proposal, signature FROM blocks WHERE number >= ? "
                              "ORDER BY number", (expected,))
        while True:
            try:
                row = cursor.fetchone()
            except sqlite3.DatabaseError as exc:
                raise LedgerTampered(self.path, expected, f"it cannot be read ({exc})") from None
            if row is None:
                break
            number, header, proposal, signature = row
            if number != expected:
                raise LedgerTampered(self.path, expected, f"it is missing (the next stored block is {number})")
            if not isinstance(header, bytes) or not isinstance(proposal, bytes) or not isinstance(signature, bytes):
                raise LedgerTampered(self.path, number, "a column holds something other than bytes")
            if number == 0:
                self._verify_genesis(header, signature)
            else:
                self._verify_block(number, header, proposal, signature)
            expected += 1
        if replica.height == 0:
            raise LedgerTampered(self.path, 0, "the genesis block is missing")
        self._check_head(advanced=replica.height != before)

    def _verify_genesis(self, header_bytes: bytes, signature: bytes) -> None:
        try:
            header = json.loads(header_bytes)
            config = header["config"]
            membership = Membership.from_json(config["membership"])
            signer = identities_pb2.SerializedIdentity.FromString(base64.b64decode(header["signer"]))
            if header["number"] != 0 or header["previous_hash"] != "":
                raise ValueError("not a genesis header")
            certificate = membership.authenticate(signer.mspid, signer.id_bytes, _utc(header["committed_at"]))
        except IdentityRejected as exc:
            raise LedgerTampered(self.path, 0, f"its signer is not a member ({exc})") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerTampered(self.path, 0, f"the genesis header is unreadable ({exc})") from None
        if not signature_valid(certificate.public_key(), header_bytes, signature):
            raise LedgerTampered(self.path, 0, "its signature does not verify")
        if (config["channel"], config["chaincode"]) != (self.channel, self.chaincode):
            raise LedgerError(f"{self.path}: this ledger is channel {config['channel']} / chaincode "
                              f"{config['chaincode']}, not {self.channel} / {self.chaincode}")
        if self.trusted_ca is not None and self.trusted_ca.strip() not in (
                pem.strip() for pem in membership.ca_certificates):
            raise LedgerError(f"{self.path}: this ledger was created for another consortium CA than the one "
                              f"this participant trusts; it is not this consortium's ledger")
        replica = self._replica
        replica.membership, replica.channel, replica.chaincode = membership, config["channel"], config["chaincode"]
        replica.hashes.append(_sha256(header_bytes))

    def _verify_block(self, number: int, header_bytes: bytes, proposal: bytes, signature: bytes) -> None:
        replica = self._replica
        try:
            header = json.loads(header_bytes)
            fields = (header["number"], header["previous_hash"], header["tx_id"], header["proposal_sha256"],
                      header["proposal_signature"], header["results_sha256"], float(header["committed_at"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerTampered(self.path, number, f"its header is unreadable ({exc})") from None
        header_number, previous, tx_id, proposal_sha256, proposal_signature, results_sha256, committed_at = fields
        if header_number != number:
            raise LedgerTampered(self.path, number, f"its header says block {header_number}")
        if previous != replica.hashes[-1]:
            raise LedgerTampered(self.path, number, f"it does not follow block {number - 1} (previous hash "
                                 f"{str(previous)[:16]}..., block {number - 1} hashes to {replica.hashes[-1][:16]}...)")
        if _sha256(proposal) != proposal_sha256:
            raise LedgerTampered(self.path, number, "its transaction does not match the hash in its header")
        try:
            signed = proposal_pb2.SignedProposal(proposal_bytes=proposal,
                                                 signature=base64.b64decode(proposal_signature))
            request = self._authenticate(signed, at=None)
        except IdentityRejected as exc:
            raise LedgerTampered(self.path, number, str(exc).removeprefix("CLINFED_IDENTITY: ")) from None
        except (ValueError, TypeError) as exc:
            raise LedgerTampered(self.path, number, f"its transaction is unreadable ({exc})") from None
        if request.tx_id != tx_id:
            raise LedgerTampered(self.path, number, "its header names another transaction")
        if tx_id in replica.tx_blocks:
            raise LedgerTampered(self.path, number, f"it repeats the transaction of block {replica.tx_blocks[tx_id]}")
        if not signature_valid(request.certificate.public_key(), header_bytes, signature):
            raise LedgerTampered(self.path, number, f"its signature does not verify with the certificate of "
                                 f"{request.msp_id}")
        self._tx_time = committed_at
        response, peer, stub = self._execute(request)
        if response.status >= _RESPONSE_OK:
            raise LedgerTampered(self.path, number, f"the contract refuses its transaction ({response.message})")
        if _results_sha256(peer, stub, response) != results_sha256:
            raise LedgerTampered(self.path, number, "its recorded results are not what the contract computes")
        self._apply(number, request, peer, stub, _sha256(header_bytes))

    def _check_head(self, advanced: bool) -> None:
        """Compare the chain with the head this participant saw last, then remember the new head."""
        if self.head_file is None:
            return
        replica = self._replica
        seen = None
        if self.head_file.is_file():
            try:
                seen = json.loads(self.head_file.read_text())
                seen_height, seen_head, seen_genesis = int(seen["height"]), seen["head"], seen["genesis"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise LedgerError(f"{self.head_file}: this participant's record of the ledger head is unreadable "
                                  f"({exc}); restore it or remove it to trust the ledger as it is now") from None
            if seen_genesis != replica.hashes[0]:
                raise LedgerTampered(self.path, 0, f"it is not the genesis block this participant saw "
                                     f"(recorded in {self.head_file}): the ledger was replaced")
            if replica.height < seen_height:
                raise LedgerTampered(self.path, replica.height, f"it is missing: the ledger ends at block "
                                     f"{replica.height - 1}, but this participant saw block {seen_height - 1} "
                                     f"(recorded in {self.head_file})")
            if replica.hashes[seen_height - 1] != seen_head:
                raise LedgerTampered(self.path, seen_height - 1, f"it differs from the block this participant saw "
                                     f"(recorded in {self.head_file})")
        if advanced or seen is None:
            self.head_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.head_file.with_name(self.head_file.name + ".tmp")
            tmp.write_text(json.dumps({"ledger": str(self.path.resolve()), "genesis": replica.hashes[0],
                                       "height": replica.height, "head": replica.hashes[-1]}, indent=2) + "\n")
            tmp.replace(self.head_file)

    # ------------------------------------------------------------------ requests

    def _authenticate(self, signed: proposal_pb2.SignedProposal, at: _dt.datetime | None) -> _Request:
        """Decode a signed proposal and check it as a peer does (see the module docstring). ``at``:
        the time the certificate must be valid at (default: the proposal's own header time)."""
        membership = self._replica.membership
        try:
            proposal = proposal_pb2.Proposal.FromString(signed.proposal_bytes)
            header = common_pb2.Header.FromString(proposal.header)
            channel_header = common_pb2.ChannelHeader.FromString(header.channel_header)
            signature_header = common_pb2.SignatureHeader.FromString(header.signature_header)
            creator = identities_pb2.SerializedIdentity.FromString(signature_header.creator)
            extension = proposal_pb2.ChaincodeHeaderExtension.FromString(channel_header.extension)
            payload = proposal_pb2.ChaincodeProposalPayload.FromString(proposal.payload)
            spec = chaincode_pb2.ChaincodeInvocationSpec.FromString(payload.input)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
            raise IdentityRejected(f"the request is not a readable signed proposal ({exc})") from None
        if channel_header.type != common_pb2.ENDORSER_TRANSACTION:
            raise IdentityRejected("the request is not an endorser transaction")
        if channel_header.channel_id != self._replica.channel or extension.chaincode_id.name != self._replica.chaincode:
            raise IdentityRejected(f"the request is for channel {channel_header.channel_id} / chaincode "
                                   f"{extension.chaincode_id.name}, not this ledger's")
        tx_id = transaction_id(signature_header.nonce, signature_header.creator)
        if channel_header.tx_id != tx_id:
            raise IdentityRejected("the request's tx_id is not sha256(nonce + creator)")
        stamp = channel_header.timestamp
        when = at or _utc(stamp.seconds + stamp.nanos / 1e9)
        certificate = membership.authenticate(creator.mspid, creator.id_bytes, when)
        if not signature_valid(certificate.public_key(), signed.proposal_bytes, signed.signature):
            raise IdentityRejected(f"the request's signature does not verify with the certificate it carries "
                                   f"(MSP {creator.mspid}): it was altered, or signed with another key")
        return _Request(signed=signed, tx_id=tx_id, msp_id=creator.mspid, creator=signature_header.creator,
                        certificate=certificate, args=list(spec.chaincode_spec.input.args), seconds=stamp.seconds,
                        nanos=stamp.nanos)

    def _execute(self, request: _Request):
        from clinfed_chaincode._shim import ChaincodeStub

        peer = _PeerSide(self._replica, self.chaincode)
        stub = ChaincodeStub(peer, self.channel, request.tx_id, chaincode_pb2.ChaincodeInput(args=request.args),
                             request.signed)
        return _run(self._chaincode.invoke(stub)), peer, stub

    def _apply(self, number: int, request: _Request, peer: _PeerSide, stub, block_hash: str) -> None:
        replica = self._replica
        replica.apply(number, request.tx_id, request.seconds, request.nanos, peer.writes)
        events = stub.get_events()
        if events:  # Fabric keeps one event per transaction: the last one set
            event = events[-1]
            replica.events.append(LedgerEvent.from_bytes(number, request.tx_id, event.event_name, bytes(event.payload)))
        replica.tx_blocks[request.tx_id] = number
        replica.blocks[number] = (request.msp_id, request.function, request.seconds, request.nanos)
        replica.hashes.append(block_hash)

    # ------------------------------------------------------------------ transactions

    def submit(self, function: str, *args: str) -> str:
        return self.process(self._signed_proposal(function, args), commit=True)

    def evaluate(self, function: str, *args: str) -> str:
        return self.process(self._signed_proposal(function, args), commit=False)

    def sign_request(self, function: str, *args: str) -> proposal_pb2.SignedProposal:
        """A signed request for ``function`` (what :meth:`submit` sends), e.g. to send it later."""
        return self._signed_proposal(function, args)

    def submit_signed(self, signed: proposal_pb2.SignedProposal) -> str:
        return self.process(signed, commit=True)

    def _signed_proposal(self, function: str, args) -> proposal_pb2.SignedProposal:
        built = build_proposal(creator=self.identity.creator, channel=self.channel, chaincode=self.chaincode,
                               function=f"{CONTRACT}:{function}", args=args, clock=self._clock)
        return proposal_pb2.SignedProposal(proposal_bytes=built.proposal_bytes,
                                           signature=self.identity.sign(built.proposal_bytes))

    def process(self, signed: proposal_pb2.SignedProposal, commit: bool) -> str:
        """What a peer does with a signed request: authenticate it, run it through the contract and,
        for a write, commit it as the next block (signed by this participant, who must be the
        request's creator). Returns the contract's answer."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE" if commit else "BEGIN")
            except sqlite3.OperationalError as exc:
                raise LedgerUnavailable(f"{self.path}: the local ledger is busy or unreadable ({exc})") from exc
            applied = False
            try:
                self._catch_up(conn)
                request = self._authenticate(signed, at=_utc(self._node_clock()))
                if commit:
                    if request.creator != self.identity.creator:
                        raise IdentityRejected(f"this ledger client commits only its own ({self.msp_id}) "
                                               f"transactions; the request is signed by {request.msp_id}")
                    if request.tx_id in self._replica.tx_blocks:
                        raise ReplayedRequest(f"CLINFED_REPLAY: transaction {request.tx_id} was already committed "
                                              f"in block {self._replica.tx_blocks[request.tx_id]}; a signed request "
                                              f"is accepted once (a replayed request)")
                self._tx_time = self._node_clock()
                response, peer, stub = self._execute(request)
                if response.status >= _RESPONSE_OK:
                    raise rejection_from_message(response.message)
                if commit:
                    self._commit(conn, request, peer, stub, response)
                    applied = True
                    conn.execute("COMMIT")
                else:
                    conn.execute("ROLLBACK")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                    if applied:
                        self._replica = _Replica()  # the block was applied but not committed: replay afresh
                if isinstance(exc, sqlite3.OperationalError):
                    raise LedgerUnavailable(f"{self.path}: could not commit to the local ledger ({exc})") from exc
                raise
            if commit:
                self._check_head(advanced=True)
        return response.payload.decode("utf-8")

    def _commit(self, conn, request: _Request, peer: _PeerSide, stub, response) -> None:
        number = self._replica.height
        header = canonical_json({
            "number": number, "previous_hash": self._replica.hashes[-1], "tx_id": request.tx_id,
            "proposal_sha256": _sha256(request.signed.proposal_bytes),
            "proposal_signature": _b64(request.signed.signature),
            "results_sha256": _results_sha256(peer, stub, response), "committed_at": self._tx_time,
        }).encode("utf-8")
        conn.execute("INSERT INTO blocks VALUES (?, ?, ?, ?)",
                     (number, header, request.signed.proposal_bytes, self.identity.sign(header)))
        self._apply(number, request, peer, stub, _sha256(header))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------ events and blocks

    def events(self, start_block: int = 0, follow: bool = False, timeout: float | None = None,
               poll_interval: float = 0.2) -> Iterator[LedgerEvent]:
        """Chaincode events from ``start_block`` on, in commit order.

        Without ``follow`` it stops at the current end; with it, it waits for new ones until
        ``timeout`` seconds pass without one (forever if ``None``).
        """
        next_block = start_block
        idle_since = time.monotonic()
        while True:
            self.verify()
            with self._lock:
                events = self._replica.events
                first = bisect.bisect_left([e.block for e in events], next_block)
                batch = events[first:first + 500]
            for event in batch:
                yield event
                next_block = event.block + 1
            if batch:
                idle_since = time.monotonic()
                continue
            if not follow or (timeout is not None and time.monotonic() - idle_since >= timeout):
                return
            time.sleep(poll_interval)

    def height(self) -> int:
        """The number of the last committed block (block 0 is the genesis block)."""
        return self.verify() - 1

    def head(self) -> tuple[int, str]:
        """(number, hash) of the last verified block."""
        self.verify()
        return self._replica.height - 1, self._replica.hashes[-1]

    def block_of(self, tx_id: str) -> dict | None:
        """The committed transaction ``tx_id``: block number, creator MSP, function and header time."""
        self.verify()
        number = self._replica.tx_blocks.get(tx_id)
        if number is None:
            return None
        msp, function, seconds, nanos = self._replica.blocks[number]
        return {"block": number, "creator_msp": msp, "function": function, "ts_seconds": seconds, "ts_nanos": nanos}


def _results_sha256(peer: _PeerSide, stub, response) -> str:
    events = stub.get_events()
    event = [events[-1].event_name, _b64(bytes(events[-1].payload))] if events else None
    writes = sorted([key, None if value is None else _b64(value)] for key, value in peer.writes.items())
    return _sha256(canonical_json({"writes": writes, "event": event,
                                   "response": _b64(bytes(response.payload))}).encode("utf-8"))


def _utc(seconds: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc)
