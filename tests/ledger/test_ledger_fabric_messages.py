"""FabricLedger's messages, parsed back and checked as a peer would check them (no network here)."""

from __future__ import annotations

import datetime as dt
import hashlib

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import NameOID
from fabric_protos.common import common_pb2
from fabric_protos.gateway import gateway_pb2
from fabric_protos.msp import identities_pb2
from fabric_protos.peer import chaincode_pb2, proposal_pb2, proposal_response_pb2, transaction_pb2
from google.protobuf import any_pb2

from clinfed.errors import ConfigError
from clinfed.ledger import AccessDenied, DuplicateRecord, LedgerError, LedgerUnavailable
from clinfed.ledger.fabric import FabricLedger, error_details
from clinfed.ledger.identity import curve_order, load_msp_identity, to_low_s
from clinfed.ledger.proposal import result_from_envelope

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
WHEN = dt.datetime(2030, 5, 6, 7, 8, 9, 500000, tzinfo=dt.timezone.utc).timestamp()


def write_msp(folder, key=None, cert_key=None):
    """An MSP folder as cryptogen writes it: signcerts/cert.pem and keystore/priv_sk."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    cert_key = cert_key or key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "User1@site1.example.com"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "site1.example.com")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(cert_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(cert_key, hashes.SHA256()))
    (folder / "signcerts").mkdir(parents=True)
    (folder / "keystore").mkdir()
    (folder / "signcerts" / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "keystore" / "priv_sk").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder


@pytest.fixture
def fabric(tmp_path) -> FabricLedger:
    msp = write_msp(tmp_path / "msp")
    return FabricLedger.from_msp("peer0.site1.example.com:7051", msp, "Site1MSP",
                                 channel="clinfed-ch", chaincode="clinfed-cc", clock=lambda: WHEN,
                                 endorsing_orgs=["Site1MSP", "Site2MSP"],
                                 tls_root_cert=msp / "signcerts" / "cert.pem")


def verify(fabric: FabricLedger, signature: bytes, message: bytes) -> None:
    fabric.identity.public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    _, s = decode_dss_signature(signature)
    assert s <= P256_ORDER // 2, "high-S signature: Fabric would reject it"


# ------------------------------------------------------------------------------ identity


def test_identity_is_loaded_from_the_msp_folder(fabric, tmp_path):
    identity = fabric.identity
    assert identity.msp_id == "Site1MSP"
    assert identity.certificate_pem == (tmp_path / "msp" / "signcerts" / "cert.pem").read_bytes()
    creator = identities_pb2.SerializedIdentity.FromString(identity.creator)
    assert (creator.mspid, creator.id_bytes) == ("Site1MSP", identity.certificate_pem)


def test_msp_folder_with_a_key_of_another_certificate_is_refused(tmp_path):
    write_msp(tmp_path / "msp", key=ec.generate_private_key(ec.SECP256R1()),
              cert_key=ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError, match="priv_sk: this key does not belong to the certificate"):
        load_msp_identity(tmp_path / "msp", "Site1MSP")
    with pytest.raises(ConfigError, match="MSP folder has no signcerts/"):
        load_msp_identity(tmp_path / "nowhere", "Site1MSP")


# ------------------------------------------------------------------------------ proposals


def test_proposal_is_built_as_the_official_clients_build_it(fabric):
    built = fabric.new_proposal("RecordContribution", ['{"job_id":"j"}'])
    proposal = proposal_pb2.Proposal.FromString(built.proposal_bytes)
    header = common_pb2.Header.FromString(proposal.header)
    channel_header = common_pb2.ChannelHeader.FromString(header.channel_header)
    signature_header = common_pb2.SignatureHeader.FromString(header.signature_header)

    assert channel_header.type == common_pb2.ENDORSER_TRANSACTION
    assert (channel_header.channel_id, channel_header.tx_id, channel_header.epoch) == ("clinfed-ch", built.tx_id, 0)
    assert (channel_header.timestamp.seconds, channel_header.timestamp.nanos) == (int(WHEN), 500_000_000)
    extension = proposal_pb2.ChaincodeHeaderExtension.FromString(channel_header.extension)
    assert extension.chaincode_id.name == "clinfed-cc"

    assert len(signature_header.nonce) == 24
    assert signature_header.creator == fabric.identity.creator
    assert built.tx_id == hashlib.sha256(signature_header.nonce + signature_header.creator).hexdigest()

    payload = proposal_pb2.ChaincodeProposalPayload.FromString(proposal.payload)
    spec = chaincode_pb2.ChaincodeInvocationSpec.FromString(payload.input).chaincode_spec
    assert spec.chaincode_id.name == "clinfed-cc"
    assert list(spec.input.args) == [b"clinfed:RecordContribution", b'{"job_id":"j"}']


def test_every_proposal_has_a_fresh_nonce_and_transaction_id(fabric):
    first, second = fabric.new_proposal("GetJob", ["j"]), fabric.new_proposal("GetJob", ["j"])
    assert first.nonce != second.nonce and first.tx_id != second.tx_id


def test_evaluate_and_endorse_requests_carry_the_signed_proposal(fabric):
    built = fabric.new_proposal("RecordContribution", ["{}"])
    evaluate = gateway_pb2.EvaluateRequest.FromString(fabric.evaluate_request(built).SerializeToString())
    endorse = gateway_pb2.EndorseRequest.FromString(fabric.endorse_request(built).SerializeToString())
    for request in (evaluate, endorse):
        assert (request.transaction_id, request.channel_id) == (built.tx_id, "clinfed-ch")
        assert request.proposed_transaction.proposal_bytes == built.proposal_bytes
        verify(fabric, request.proposed_transaction.signature, built.proposal_bytes)
    assert list(endorse.endorsing_organizations) == ["Site1MSP", "Site2MSP"]
    assert list(evaluate.target_organizations) == ["Site1MSP", "Site2MSP"]


def test_signatures_are_always_low_s_and_verify(fabric):
    message = b"clinfed"
    signatures = [fabric.identity.sign(message) for _ in range(40)]  # without normalising, ~half would be high-S
    for signature in signatures:
        verify(fabric, signature, message)


def test_high_s_signature_is_normalised_to_an_equivalent_low_s_one(fabric):
    key = fabric.identity.private_key
    message = b"round 3 contribution"
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    high = encode_dss_signature(r, s if s > P256_ORDER // 2 else P256_ORDER - s)
    fabric.identity.public_key.verify(high, message, ec.ECDSA(hashes.SHA256()))  # valid, but high-S
    low = to_low_s(high, curve_order(key))
    assert decode_dss_signature(low)[1] <= P256_ORDER // 2
    verify(fabric, low, message)
    with pytest.raises(InvalidSignature):
        fabric.identity.public_key.verify(low, b"another message", ec.ECDSA(hashes.SHA256()))


def test_submit_signs_the_endorsed_transaction_payload(fabric):
    prepared = common_pb2.Envelope(payload=b"endorsed transaction bytes", signature=b"")
    request = gateway_pb2.SubmitRequest.FromString(fabric.submit_request("tx-1", prepared).SerializeToString())
    assert (request.transaction_id, request.channel_id) == ("tx-1", "clinfed-ch")
    assert request.prepared_transaction.payload == prepared.payload
    verify(fabric, request.prepared_transaction.signature, prepared.payload)


def test_commit_status_and_event_requests_are_signed_by_the_client(fabric):
    signed = fabric.commit_status_request("tx-9")
    request = gateway_pb2.CommitStatusRequest.FromString(signed.request)
    assert (request.transaction_id, request.channel_id, request.identity) == ("tx-9", "clinfed-ch",
                                                                             fabric.identity.creator)
    verify(fabric, signed.signature, signed.request)

    signed = fabric.chaincode_events_request(start_block=12)
    request = gateway_pb2.ChaincodeEventsRequest.FromString(signed.request)
    assert (request.channel_id, request.chaincode_id, request.identity) == ("clinfed-ch", "clinfed-cc",
                                                                           fabric.identity.creator)
    assert request.start_position.specified.number == 12
    verify(fabric, signed.signature, signed.request)
    assert gateway_pb2.ChaincodeEventsRequest.FromString(
        fabric.chaincode_events_request(None).request).start_position.HasField("next_commit")


def test_result_is_read_from_the_endorsed_transaction(fabric):
    action = proposal_pb2.ChaincodeAction(response=proposal_response_pb2.Response(status=200, payload=b'{"ok":1}'))
    response_payload = proposal_response_pb2.ProposalResponsePayload(extension=action.SerializeToString())
    action_payload = transaction_pb2.ChaincodeActionPayload(
        action=transaction_pb2.ChaincodeEndorsedAction(proposal_response_payload=response_payload.SerializeToString()))
    transaction = transaction_pb2.Transaction(actions=[transaction_pb2.TransactionAction(
        payload=action_payload.SerializeToString())])
    envelope = common_pb2.Envelope(payload=common_pb2.Payload(data=transaction.SerializeToString()).SerializeToString())
    assert result_from_envelope(envelope) == b'{"ok":1}'


# ------------------------------------------------------------------------------ errors


class _RpcError(grpc.RpcError):
    def __init__(self, code, message, details=()):
        self._code, self._message, self._details = code, message, details

    def code(self):
        return self._code

    def details(self):
        return self._message

    def trailing_metadata(self):
        status = _field(1, _varint(self._code.value[0])) + _field(2, self._message.encode(), length=True)
        for detail in self._details:
            packed = any_pb2.Any(type_url="type.googleapis.com/gateway.ErrorDetail", value=detail.SerializeToString())
            status += _field(3, packed.SerializeToString(), length=True)
        return (("grpc-status-details-bin", status),)


def _varint(value: int) -> bytes:
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


def _field(number: int, value: bytes, length: bool = False) -> bytes:
    return _varint(number << 3 | (2 if length else 0)) + (_varint(len(value)) if length else b"") + value


def test_chaincode_refusal_in_the_gateway_error_details_keeps_its_code(fabric):
    detail = gateway_pb2.ErrorDetail(address="peer0.site2:7051", msp_id="Site2MSP",
                                     message="chaincode response 500, CLINFED_DUPLICATE: contribution of site "
                                             "site-1 to job j round 0 is already recorded")
    error = _RpcError(grpc.StatusCode.ABORTED, "failed to endorse transaction, see attached details", [detail])
    assert error_details(error)[0].msp_id == "Site2MSP"

    def endorse(request, timeout):
        raise error

    with pytest.raises(DuplicateRecord, match="^CLINFED_DUPLICATE: contribution of site site-1"):
        fabric._call("Endorse", endorse, None, 1.0, "RecordContribution")

    def evaluate(request, timeout):
        raise _RpcError(grpc.StatusCode.UNKNOWN, "evaluate call to endorser returned error: chaincode response 500, "
                                                 "CLINFED_ACCESS_DENIED: MSP Site2MSP may not ...")

    with pytest.raises(AccessDenied):
        fabric._call("Evaluate", evaluate, None, 1.0, "GetJob")


def test_other_gateway_failures_name_the_peer_and_say_whether_to_retry(fabric):
    detail = gateway_pb2.ErrorDetail(address="peer0.site2:7051", msp_id="Site2MSP", message="access denied")

    def failing(code):
        def call(request, timeout):
            raise _RpcError(code, "boom", [detail])
        return call

    with pytest.raises(LedgerUnavailable):
        fabric._call("Submit", failing(grpc.StatusCode.UNAVAILABLE), None, 1.0, "RecordContribution")
    with pytest.raises(LedgerError, match=r"Endorse of RecordContribution via peer0.site1.example.com:7051 failed "
                                          r"\(PERMISSION_DENIED: boom\) "
                                          r"\[Site2MSP at peer0.site2:7051: access denied\]"):
        fabric._call("Endorse", failing(grpc.StatusCode.PERMISSION_DENIED), None, 1.0, "RecordContribution")


def test_unreachable_peer_is_reported_as_unavailable(tmp_path):
    msp = write_msp(tmp_path / "msp")
    ledger = FabricLedger.from_msp("127.0.0.1:1", msp, "Site1MSP", timeouts={"evaluate": 3.0},
                                   tls_root_cert=msp / "signcerts" / "cert.pem")
    try:
        with pytest.raises(LedgerUnavailable, match="Evaluate of GetContributions via 127.0.0.1:1 failed"):
            ledger.job("j")
    finally:
        ledger.close()


def test_a_client_without_tls_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no TLS root certificate given; the ledger is reached over TLS only "
                                          r"\(plaintext is refused\)"):
        FabricLedger.from_msp("127.0.0.1:7051", write_msp(tmp_path / "msp"), "Site1MSP")


class _Gateway:
    """A peer gateway whose Submit fails as BFT orderers can make it fail (fabric#4415) although the
    transaction was ordered: the client must ask CommitStatus before reporting a failure."""

    def __init__(self, committed: bool):
        self.committed, self.calls = committed, []

    def Submit(self, request, timeout):
        self.calls.append("Submit")
        raise _RpcError(grpc.StatusCode.UNAVAILABLE, "insufficient number of orderers could successfully process "
                        "transaction to satisfy quorum requirement", [])

    def CommitStatus(self, request, timeout):
        self.calls.append("CommitStatus")
        if not self.committed:
            raise _RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "no commit", [])
        return gateway_pb2.CommitStatusResponse(result=transaction_pb2.VALID, block_number=7)


@pytest.mark.parametrize("committed", [True, False])
def test_a_failed_submit_is_checked_against_commit_status(fabric, committed):
    gateway = _Gateway(committed)
    fabric._gateway = lambda: gateway
    envelope = common_pb2.Envelope(payload=b"endorsed")
    if committed:
        assert fabric.submit_prepared("tx-1", envelope, "RecordContribution") == 7
    else:
        with pytest.raises(LedgerUnavailable, match="Submit of RecordContribution .* insufficient number of orderers"):
            fabric.submit_prepared("tx-1", envelope, "RecordContribution")
    assert gateway.calls == ["Submit", "CommitStatus"]
