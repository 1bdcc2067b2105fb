"""Fabric transaction proposals, built as the official clients build them.

Modelled on fabric-gateway's ``proposalbuilder.go`` / ``transactioncontext.go`` and Fabric's
``protoutil.CreateChaincodeProposalWithTransient``: a 24-byte random nonce, ``tx_id =
hex(sha256(nonce + creator))``, an ``ENDORSER_TRANSACTION`` channel header carrying the
chaincode in a ``ChaincodeHeaderExtension`` and the client's timestamp, and the function name
and arguments in a ``ChaincodeInvocationSpec``. LocalLedger feeds the same proposal to the
in-process chaincode, so the contract decodes its caller and time exactly as on a peer.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from fabric_protos.common import common_pb2
from fabric_protos.peer import chaincode_pb2, proposal_pb2, proposal_response_pb2, transaction_pb2

NONCE_BYTES = 24


@dataclass(frozen=True)
class BuiltProposal:
    tx_id: str
    nonce: bytes
    proposal: proposal_pb2.Proposal
    proposal_bytes: bytes
    args: tuple


def transaction_id(nonce: bytes, creator: bytes) -> str:
    return hashlib.sha256(nonce + creator).hexdigest()


def build_proposal(*, creator: bytes, channel: str, chaincode: str, function: str, args: Sequence[str | bytes],
                   clock: Callable[[], float] = time.time, nonce: bytes | None = None,
                   transient: dict | None = None) -> BuiltProposal:
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    tx_id = transaction_id(nonce, creator)
    encoded = tuple(a if isinstance(a, bytes) else a.encode("utf-8") for a in (function, *args))

    spec = chaincode_pb2.ChaincodeInvocationSpec(chaincode_spec=chaincode_pb2.ChaincodeSpec(
        type=chaincode_pb2.ChaincodeSpec.NODE,  # as fabric-gateway sends it; peers ignore it for invocations
        chaincode_id=chaincode_pb2.ChaincodeID(name=chaincode),
        input=chaincode_pb2.ChaincodeInput(args=list(encoded)),
    ))
    payload = proposal_pb2.ChaincodeProposalPayload(input=spec.SerializeToString(), TransientMap=transient or {})

    now = clock()
    seconds = int(now // 1)
    channel_header = common_pb2.ChannelHeader(
        type=common_pb2.ENDORSER_TRANSACTION,
        channel_id=channel,
        tx_id=tx_id,
        epoch=0,
        extension=proposal_pb2.ChaincodeHeaderExtension(
            chaincode_id=chaincode_pb2.ChaincodeID(name=chaincode)).SerializeToString(),
    )
    channel_header.timestamp.seconds = seconds
    channel_header.timestamp.nanos = min(int(round((now - seconds) * 1e9)), 999_999_999)
    header = common_pb2.Header(
        channel_header=channel_header.SerializeToString(),
        signature_header=common_pb2.SignatureHeader(creator=creator, nonce=nonce).SerializeToString(),
    )
    proposal = proposal_pb2.Proposal(header=header.SerializeToString(), payload=payload.SerializeToString())
    return BuiltProposal(tx_id=tx_id, nonce=nonce, proposal=proposal,
                         proposal_bytes=proposal.SerializeToString(), args=encoded)


def result_from_envelope(envelope: common_pb2.Envelope) -> bytes:
    """The chaincode's return value inside an endorsed transaction envelope (``transactionparser.go``)."""
    payload = common_pb2.Payload.FromString(envelope.payload)
    transaction = transaction_pb2.Transaction.FromString(payload.data)
    problems = []
    for action in transaction.actions:
        try:
            action_payload = transaction_pb2.ChaincodeActionPayload.FromString(action.payload)
            response_payload = proposal_response_pb2.ProposalResponsePayload.FromString(
                action_payload.action.proposal_response_payload)
            chaincode_action = proposal_pb2.ChaincodeAction.FromString(response_payload.extension)
            return chaincode_action.response.payload
        except Exception as exc:  # noqa: BLE001 - try the next action, as the Go client does
            problems.append(str(exc))
    raise ValueError(f"no proposal response in the prepared transaction: {problems}")
