"""Each organisation runs the contract itself; one that runs a modified contract cannot get a
forged record committed, because a record needs the endorsement of a majority of the
organisations that run a peer (OutOf(3) of 4 here), each from its own chaincode service."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import sys
from pathlib import Path

import pytest
from fabric_protos.peer import transaction_pb2

from clinfed.ledger import GlobalModel
from clinfed.ledger.errors import AccessDenied
from clinfed.ledger.fabric import CommitFailed
from fabric_network import testing
from test_fabric_network import JOB, contribution

FORGED = [sys.executable, str(Path(__file__).with_name("forged_contract.py"))]


def model(round_: int = 0) -> GlobalModel:
    return GlobalModel(job_id=JOB, round=round_, model_sha256=hashlib.sha256(f"forged/{round_}".encode()).hexdigest(),
                       participants=["site-1", "site-2", "site-3"], expected_sites=["site-1", "site-2", "site-3"],
                       aggregation="fedavg", n_samples=120)


@contextlib.contextmanager
def forged_services(net):
    """``swap(msp_id)`` replaces that org's chaincode service with the modified contract (same
    package, address and TLS identity: what the org itself controls); all are restored after."""
    swapped = []

    def swap(msp_id: str):
        service = net.chaincode_service_of(msp_id)
        net.processes.restart(service, command=FORGED)
        swapped.append(service)

    try:
        yield swap
    finally:
        for service in swapped:
            net.processes.restart(service)


def test_each_org_runs_its_own_chaincode_service_from_its_own_package(fabric_net):
    services = {fabric_net.spec.nodes[s]["org"]: s for s in fabric_net.chaincode_services}
    assert sorted(services) == sorted(fabric_net.peer_orgs) == ["Coordinator", "Site1", "Site2", "Site3"]
    assert len(set(fabric_net.spec.package_ids.values())) == 4  # one package ID per org
    assert len({fabric_net.spec.nodes[s]["pid"] for s in services.values()}) == 4  # one process per org
    for org, service in services.items():
        assert fabric_net.processes.is_running(service)
        # the service listens on its own organisation's host, beside that org's peer
        assert fabric_net.spec.nodes[service]["host"] == fabric_net.spec.nodes[fabric_net.peer_of(f"{org}MSP")]["host"]
    # Site1's service takes only clients with a certificate of Site1's TLS CA: its own peer's
    # certificate opens an HTTP/2 session, Site2's peer's is refused.
    site1 = fabric_net.spec.nodes[services["Site1"]]
    assert _first_bytes_from(fabric_net, site1, client=fabric_net.peer_of("Site1MSP"))
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        _first_bytes_from(fabric_net, site1, client=fabric_net.peer_of("Site2MSP"))


def _first_bytes_from(net, service: dict, client: str) -> bytes:
    """What a chaincode service sends a client presenting ``client``'s TLS certificate, after the
    HTTP/2 preface (its SETTINGS frame, if it accepts the client)."""
    context = ssl.create_default_context(cafile=str(net.tls_ca(service["org"])))
    context.set_alpn_protocols(["h2"])
    tls_dir = net.node_dir(client) / "tls"
    context.load_cert_chain(tls_dir / "server.crt", tls_dir / "server.key")
    with socket.create_connection((service["host"], service["ports"]["listen"]), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=service["host"]) as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            data = tls.recv(9)  # TLS 1.3: a refused client certificate is reported on the first read
            if not data:
                raise ConnectionResetError("closed by the chaincode service")
            return data


def test_a_modified_contract_at_one_org_cannot_get_a_forged_record_committed(fabric_net):
    name = testing.fresh_chaincode(fabric_net)
    with forged_services(fabric_net) as swap:
        swap("Site1MSP")
        lone = fabric_net.clients.ledger("Site1MSP", chaincode=name, endorsing_orgs=["Site1MSP"])
        # Site1's own peer endorses the forgeries (its modified contract allows them), so they reach
        # the orderer; every peer then refuses them at validation.
        for forge in (lambda: lone.record_contribution(contribution("site-2")), lambda: lone.record_global_model(model())):
            with pytest.raises(CommitFailed) as err:
                forge()
            assert err.value.code == transaction_pb2.ENDORSEMENT_POLICY_FAILURE
        # No honest organisation endorses them, whichever endorsers the forger asks for.
        for endorsers in (None, ["Site1MSP", "Site2MSP", "Site3MSP"], ["Site1MSP", "CoordinatorMSP", "Site3MSP"]):
            forger = fabric_net.clients.ledger("Site1MSP", chaincode=name, endorsing_orgs=endorsers)
            with pytest.raises(AccessDenied, match="may not record contributions of site site-2"):
                forger.record_contribution(contribution("site-2"))
    reader = fabric_net.clients.ledger("CoordinatorMSP", chaincode=name)
    assert reader.contributions(JOB) == [] and reader.global_models(JOB) == []
    # The honest contract is back at Site1: its own peer alone now refuses the same forgery.
    with pytest.raises(AccessDenied):
        fabric_net.clients.ledger("Site1MSP", chaincode=name, endorsing_orgs=["Site1MSP"]).record_global_model(model())


def test_the_policy_yields_only_to_a_majority_of_orgs_running_the_modified_contract(fabric_net):
    """The limit of MAJORITY, checked so that the test above is known to depend on the policy:
    two of four colluding organisations still fail; three (a majority) can write a global model
    without the coordinator."""
    name = testing.fresh_chaincode(fabric_net)
    reader = fabric_net.clients.ledger("CoordinatorMSP", chaincode=name)
    with forged_services(fabric_net) as swap:
        swap("Site1MSP")
        swap("Site2MSP")
        pair = fabric_net.clients.ledger("Site1MSP", chaincode=name, endorsing_orgs=["Site1MSP", "Site2MSP"])
        with pytest.raises(CommitFailed) as err:
            pair.record_global_model(model(0))
        assert err.value.code == transaction_pb2.ENDORSEMENT_POLICY_FAILURE
        swap("Site3MSP")
        trio = fabric_net.clients.ledger("Site1MSP", chaincode=name, synced=True,
                                         endorsing_orgs=["Site1MSP", "Site2MSP", "Site3MSP"])
        forged = trio.record_global_model(model(1))
        assert [m.round for m in reader.global_models(JOB)] == [1] and forged.recorded_by == "Site1MSP"
