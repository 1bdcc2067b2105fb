"""FabricLedger: the clinfed contract on a Fabric channel, through a peer's Gateway gRPC service.

No maintained Python Gateway client exists, so this is a small one modelled on the official Go
and Node clients (hyperledger/fabric-gateway): a query is one signed ``Evaluate``; a write is a
signed ``Endorse``, the returned transaction envelope signed and sent with ``Submit``, then a
signed ``CommitStatus`` that waits for the block. Chaincode events come from the signed
``ChaincodeEvents`` stream. Every message is built by a method of its own so it can be checked
without a network.

Errors: a chaincode refusal (``CLINFED_<CODE>: ...`` in the gateway's ``ErrorDetail``) becomes
the matching :class:`~clinfed.ledger.errors.LedgerRejected`; an unreachable or timed-out
gateway, or an MVCC conflict at commit, becomes :class:`~clinfed.ledger.errors.LedgerUnavailable`
(safe to retry: a retried write that did commit is then refused as a duplicate). A failed
``Submit`` is not taken at its word: the orderers may have ordered the transaction anyway (on
BFT, some answer "request already processed" and the gateway reports a quorum failure,
hyperledger/fabric#4415), so the client asks ``CommitStatus`` before it reports a failure.

TLS is required: a client without the peer's TLS root certificate is refused, never connected in
plaintext.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import grpc
from fabric_protos.common import common_pb2
from fabric_protos.gateway import gateway_pb2, gateway_pb2_grpc
from fabric_protos.orderer import ab_pb2
from fabric_protos.peer import chaincode_pb2, proposal_pb2, transaction_pb2
from google.protobuf import any_pb2

from clinfed.errors import ConfigError

from .base import CONTRACT, ContractLedger
from .errors import LedgerError, LedgerUnavailable, rejection_from_message
from .identity import SigningIdentity, load_msp_identity
from .proposal import BuiltProposal, build_proposal, result_from_envelope
from .records import LedgerEvent

_RETRYABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED}
_RETRYABLE_VALIDATION = {transaction_pb2.MVCC_READ_CONFLICT, transaction_pb2.PHANTOM_READ_CONFLICT}


class CommitFailed(LedgerError):
    """The transaction was ordered but the peers marked it invalid (``code`` is the TxValidationCode)."""

    def __init__(self, tx_id: str, code: int):
        self.tx_id, self.code = tx_id, code
        name = transaction_pb2.TxValidationCode.Name(code) if code in transaction_pb2.TxValidationCode.values() \
            else str(code)
        super().__init__(f"transaction {tx_id} was not committed: validation code {name}")


class FabricLedger(ContractLedger):
    """The ledger on a Fabric channel, as one client identity.

    Args:
        endpoint: the peer's gateway address, ``host:port``.
        identity: who signs (see :func:`~clinfed.ledger.identity.load_msp_identity`).
        channel: channel name.
        chaincode: chaincode name as deployed.
        tls_root_cert: PEM of the peer's TLS CA (bytes or a path); required (plaintext is refused)
            unless ``channel_factory`` supplies the transport.
        tls_client_cert / tls_client_key: PEM (bytes or paths) when the peer requires mutual TLS.
        server_name: TLS server name to expect when it differs from the endpoint's host.
        endorsing_orgs: MSP IDs to endorse every write; default: the gateway chooses by policy.
        timeouts: seconds for ``evaluate``, ``endorse``, ``submit`` and ``commit``.
        clock: seconds since the epoch for proposal headers.
        channel_factory: builds the gRPC channel (tests and custom transports).
    """

    def __init__(self, endpoint: str, identity: SigningIdentity, *, channel: str = "clinfed",
                 chaincode: str = "clinfed", tls_root_cert: bytes | str | Path | None = None,
                 tls_client_cert: bytes | str | Path | None = None, tls_client_key: bytes | str | Path | None = None,
                 server_name: str | None = None, endorsing_orgs: Sequence[str] | None = None,
                 timeouts: dict | None = None, clock: Callable[[], float] = time.time,
                 channel_factory: Callable[[], grpc.Channel] | None = None):
        self.endpoint = endpoint
        self.identity = identity
        self.msp_id = identity.msp_id
        self.channel = channel
        self.chaincode = chaincode
        self.endorsing_orgs = list(endorsing_orgs or [])
        self.timeouts = {"evaluate": 5.0, "endorse": 15.0, "submit": 5.0, "commit": 60.0}
        self.timeouts.update(timeouts or {})
        self._clock = clock
        self._tls = (tls_root_cert, tls_client_cert, tls_client_key)
        self._server_name = server_name
        self._channel_factory = channel_factory
        if tls_root_cert is None and channel_factory is None:
            raise ConfigError(f"Fabric gateway {endpoint}: no TLS root certificate given; the ledger is reached "
                              f"over TLS only (plaintext is refused): set tls_root_cert to the peer's TLS CA")
        self._grpc_channel: grpc.Channel | None = None
        self._stub: gateway_pb2_grpc.GatewayStub | None = None
        self._stub_lock = threading.Lock()

    @classmethod
    def from_msp(cls, endpoint: str, msp_dir: str | Path, msp_id: str, **kwargs) -> "FabricLedger":
        """A client signing as the user in ``msp_dir`` (``signcerts/`` + ``keystore/``)."""
        return cls(endpoint, load_msp_identity(msp_dir, msp_id), **kwargs)

    def __repr__(self):
        return f"FabricLedger({self.endpoint!r}, msp_id={self.msp_id!r}, channel={self.channel!r})"

    # ------------------------------------------------------------------ messages (no network)

    def new_proposal(self, function: str, args: Sequence[str | bytes] = ()) -> BuiltProposal:
        return build_proposal(creator=self.identity.creator, channel=self.channel, chaincode=self.chaincode,
                              function=f"{CONTRACT}:{function}", args=args, clock=self._clock)

    def signed_proposal(self, built: BuiltProposal) -> proposal_pb2.SignedProposal:
        return proposal_pb2.SignedProposal(proposal_bytes=built.proposal_bytes,
                                           signature=self.identity.sign(built.proposal_bytes))

    def evaluate_request(self, built: BuiltProposal) -> gateway_pb2.EvaluateRequest:
        return gateway_pb2.EvaluateRequest(transaction_id=built.tx_id, channel_id=self.channel,
                                           proposed_transaction=self.signed_proposal(built),
                                           target_organizations=self.endorsing_orgs)

    def endorse_request(self, built: BuiltProposal) -> gateway_pb2.EndorseRequest:
        return gateway_pb2.EndorseRequest(transaction_id=built.tx_id, channel_id=self.channel,
                                          proposed_transaction=self.signed_proposal(built),
                                          endorsing_organizations=self.endorsing_orgs)

    def submit_request(self, tx_id: str, prepared: common_pb2.Envelope) -> gateway_pb2.SubmitRequest:
        """Sign the endorsed envelope's payload and wrap it for ``Submit``."""
        envelope = common_pb2.Envelope(payload=prepared.payload, signature=self.identity.sign(prepared.payload))
        return gateway_pb2.SubmitRequest(transaction_id=tx_id, channel_id=self.channel, prepared_transaction=envelope)

    def commit_status_request(self, tx_id: str) -> gateway_pb2.SignedCommitStatusRequest:
        request = gateway_pb2.CommitStatusRequest(transaction_id=tx_id, channel_id=self.channel,
                                                  identity=self.identity.creator).SerializeToString()
        return gateway_pb2.SignedCommitStatusRequest(request=request, signature=self.identity.sign(request))

    def chaincode_events_request(self, start_block: int | None = None,
                                 after_tx_id: str = "") -> gateway_pb2.SignedChaincodeEventsRequest:
        """Events from ``start_block`` (inclusive), or from the next commit when ``None``."""
        position = ab_pb2.SeekPosition(next_commit=ab_pb2.SeekNextCommit()) if start_block is None else \
            ab_pb2.SeekPosition(specified=ab_pb2.SeekSpecified(number=start_block))
        request = gateway_pb2.ChaincodeEventsRequest(channel_id=self.channel, chaincode_id=self.chaincode,
                                                     identity=self.identity.creator, start_position=position,
                                                     after_transaction_id=after_tx_id).SerializeToString()
        return gateway_pb2.SignedChaincodeEventsRequest(request=request, signature=self.identity.sign(request))

    # ------------------------------------------------------------------ transport

    def _gateway(self) -> gateway_pb2_grpc.GatewayStub:
        with self._stub_lock:  # one channel per client, however many threads ask at once
            if self._stub is None:
                if self._channel_factory is not None:
                    self._grpc_channel = self._channel_factory()
                else:
                    root, cert, key = (_read_pem(v) for v in self._tls)
                    credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key,
                                                               certificate_chain=cert)
                    options = [("grpc.ssl_target_name_override", self._server_name)] if self._server_name else []
                    self._grpc_channel = grpc.secure_channel(self.endpoint, credentials, options=options)
                self._stub = gateway_pb2_grpc.GatewayStub(self._grpc_channel)
            return self._stub

    def close(self) -> None:
        with self._stub_lock:
            if self._grpc_channel is not None:
                self._grpc_channel.close()
            self._grpc_channel = self._stub = None

    # ------------------------------------------------------------------ transactions

    def evaluate(self, function: str, *args: str) -> str:
        built = self.new_proposal(function, args)
        response = self._call("Evaluate", self._gateway().Evaluate, self.evaluate_request(built),
                              self.timeouts["evaluate"], function)
        return response.result.payload.decode("utf-8")

    def submit(self, function: str, *args: str) -> str:
        return self.submit_signed(self.signed_proposal(self.new_proposal(function, args)))

    def sign_request(self, function: str, *args: str) -> proposal_pb2.SignedProposal:
        """A signed proposal for ``function`` (what :meth:`submit` sends), e.g. to send it later."""
        return self.signed_proposal(self.new_proposal(function, args))

    def submit_signed(self, signed: proposal_pb2.SignedProposal) -> str:
        """Endorse, submit and wait for the commit of a signed proposal; the contract's answer."""
        tx_id, function = _proposal_ids(signed.proposal_bytes)
        endorsed = self._call("Endorse", self._gateway().Endorse, gateway_pb2.EndorseRequest(
            transaction_id=tx_id, channel_id=self.channel, proposed_transaction=signed,
            endorsing_organizations=self.endorsing_orgs), self.timeouts["endorse"], function)
        prepared = endorsed.prepared_transaction
        result = result_from_envelope(prepared)
        self.submit_prepared(tx_id, prepared, function)
        return result.decode("utf-8")

    def submit_prepared(self, tx_id: str, prepared: common_pb2.Envelope, function: str = "") -> int:
        """Sign and submit an endorsed transaction and wait until it is committed VALID; returns its
        block. A failed ``Submit`` is checked against ``CommitStatus`` first: if the transaction
        was ordered anyway (BFT "request already processed", fabric#4415), that is a success."""
        try:
            self._call("Submit", self._gateway().Submit, self.submit_request(tx_id, prepared),
                       self.timeouts["submit"], function)
        except LedgerError as submit_error:
            status = self._commit_status_after_failed_submit(tx_id, function)
            if status is None:
                raise submit_error
        else:
            status = self._call("CommitStatus", self._gateway().CommitStatus, self.commit_status_request(tx_id),
                                self.timeouts["commit"], function)
        if status.result != transaction_pb2.VALID:
            if status.result in _RETRYABLE_VALIDATION:
                raise LedgerUnavailable(str(CommitFailed(tx_id, status.result)) + "; retry the transaction")
            raise CommitFailed(tx_id, status.result)
        return status.block_number

    def _commit_status_after_failed_submit(self, tx_id: str, function: str, wait: float = 10.0):
        """The commit status of a transaction whose Submit reported an error, if it was committed
        within ``wait`` seconds; None when it was not (the error stands)."""
        try:
            return self._call("CommitStatus", self._gateway().CommitStatus, self.commit_status_request(tx_id),
                              min(wait, self.timeouts["commit"]), function)
        except LedgerError:
            return None

    def events(self, start_block: int = 0, follow: bool = False, timeout: float | None = None) -> Iterator[LedgerEvent]:
        """Chaincode events from ``start_block`` on. Without ``follow`` the stream stops at the
        channel's current height (the last block, with or without events of ours; at most
        ``timeout`` seconds, default 5); with it, it runs until ``timeout`` (forever if ``None``)."""
        end = None if follow else self.chain_height() - 1
        if end is not None and end < start_block:
            return
        deadline = timeout if (follow or timeout is not None) else 5.0
        stream = self._gateway().ChaincodeEvents(self.chaincode_events_request(start_block), timeout=deadline)
        try:
            for response in stream:
                for event in response.events:
                    yield LedgerEvent.from_bytes(response.block_number, event.tx_id, event.event_name, event.payload)
                if end is not None and response.block_number >= end:
                    stream.cancel()
                    return
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                return
            raise _translate(exc, "ChaincodeEvents", self.endpoint, "events") from exc

    def chain_height(self) -> int:
        """The channel's height on the gateway's peer (qscc GetChainInfo)."""
        built = build_proposal(creator=self.identity.creator, channel=self.channel, chaincode="qscc",
                               function="GetChainInfo", args=[self.channel], clock=self._clock)
        request = gateway_pb2.EvaluateRequest(transaction_id=built.tx_id, channel_id=self.channel,
                                              proposed_transaction=self.signed_proposal(built),
                                              target_organizations=[self.msp_id])
        reply = self._call("Evaluate", self._gateway().Evaluate, request, self.timeouts["evaluate"], "GetChainInfo")
        # common.BlockchainInfo (not in the Python protos): field 1 is the height.
        return next((v for n, v in _wire_fields(reply.result.payload) if n == 1), 0)

    def _call(self, name: str, method, request, timeout: float, function: str):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _translate(exc, name, self.endpoint, function) from exc


# ---------------------------------------------------------------------- errors


def error_details(error: grpc.RpcError) -> list[gateway_pb2.ErrorDetail]:
    """The ``gateway.ErrorDetail`` entries of a failed call (one per endorsing peer that failed)."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    raw = next((value for key, value in (trailers or ()) if key == "grpc-status-details-bin"), None)
    if not raw:
        return []
    details = []
    for number, value in _wire_fields(raw):
        if number == 3:  # google.rpc.Status.details: repeated google.protobuf.Any
            packed = any_pb2.Any.FromString(value)
            if packed.type_url.endswith("/gateway.ErrorDetail"):
                details.append(gateway_pb2.ErrorDetail.FromString(packed.value))
    return details


def _translate(error: grpc.RpcError, call: str, endpoint: str, function: str) -> LedgerError:
    code = error.code() if hasattr(error, "code") else None
    message = error.details() if hasattr(error, "details") else str(error)
    details = error_details(error)
    texts = [message or ""] + [d.message for d in details]
    for text in texts:
        if "CLINFED_" in text:
            return rejection_from_message(text)
    where = "; ".join(f"{d.msp_id or '?'} at {d.address or '?'}: {d.message}" for d in details)
    summary = f"{call} of {function} via {endpoint} failed ({code.name if code else 'error'}: {message})" + \
        (f" [{where}]" if where else "")
    if code in _RETRYABLE_CODES:
        return LedgerUnavailable(summary)
    return LedgerError(summary)


def _wire_fields(buffer: bytes):
    """(field number, value) of the length-delimited and varint fields of a protobuf message."""
    position, end = 0, len(buffer)

    def varint():
        nonlocal position
        result = shift = 0
        while True:
            byte = buffer[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while position < end:
        tag = varint()
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            yield number, varint()
        elif wire_type == 2:
            length = varint()
            yield number, buffer[position:position + length]
            position += length
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        else:
            return


def _proposal_ids(proposal_bytes: bytes) -> tuple[str, str]:
    """(tx_id, function) of a serialized proposal."""
    proposal = proposal_pb2.Proposal.FromString(proposal_bytes)
    header = common_pb2.Header.FromString(proposal.header)
    tx_id = common_pb2.ChannelHeader.FromString(header.channel_header).tx_id
    spec = chaincode_pb2.ChaincodeInvocationSpec.FromString(
        proposal_pb2.ChaincodeProposalPayload.FromString(proposal.payload).input)
    args = spec.chaincode_spec.input.args
    return tx_id, (args[0].decode("utf-8", "replace").split(":", 1)[-1] if args else "")


def _read_pem(value) -> bytes | None:
    """PEM given as bytes, as a PEM string, or as a path to a file."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and "-----BEGIN" in value:
        return value.encode()
    path = Path(value)
    if not path.is_file():
        raise LedgerError(f"{path}: TLS PEM file not found")
    return path.read_bytes()
