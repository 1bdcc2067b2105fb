"""SmartBFT ordering: four orderers tolerate one faulty (here: stopped) orderer."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from fabric_protos.gateway import gateway_pb2
from fabric_protos.peer import transaction_pb2

from clinfed.ledger.fabric import _proposal_ids, error_details
from fabric_network import testing
from test_fabric_network import JOB, contribution


def test_bft_commits_with_one_of_four_orderers_stopped(bft_net):
    assert len(bft_net.orderers) == 4
    name = testing.fresh_chaincode(bft_net)
    writer = bft_net.clients.ledger("Site1MSP", chaincode=name, synced=True)
    first = writer.record_contribution(contribution("site-1", 0))
    bft_net.processes.stop(bft_net.orderers[-1])
    try:
        started = time.monotonic()
        second = writer.record_contribution(contribution("site-1", 1))
        assert time.monotonic() - started < 60
    finally:
        bft_net.processes.start(bft_net.orderers[-1])
    assert bft_net.clients.ledger("CoordinatorMSP", chaincode=name).contributions(JOB) == [first, second]


def test_bft_submit_answered_request_already_processed_reports_success(bft_net):
    """An endorsed transaction the orderers have already ordered, submitted again (as a client
    does that retries after a lost answer): the BFT orderers answer "request already processed"
    and the gateway reports a failed Submit (hyperledger/fabric#4415), though the transaction is
    committed VALID. The client asks CommitStatus and reports the success."""
    name = testing.fresh_chaincode(bft_net)
    writer = bft_net.clients.ledger("Site1MSP", chaincode=name, synced=True)
    signed = writer.sign_request("RecordContribution", json.dumps(contribution("site-1", 7).to_request()))
    tx_id, _ = _proposal_ids(signed.proposal_bytes)
    gateway = writer._gateway()
    endorsed = gateway.Endorse(gateway_pb2.EndorseRequest(
        transaction_id=tx_id, channel_id=writer.channel, proposed_transaction=signed), timeout=30)
    request = writer.submit_request(tx_id, endorsed.prepared_transaction)
    gateway.Submit(request, timeout=30)
    assert gateway.CommitStatus(writer.commit_status_request(tx_id), timeout=60).result == transaction_pb2.VALID
    with pytest.raises(grpc.RpcError) as refused:  # what a client that trusts Submit would report
        gateway.Submit(request, timeout=30)
    assert "already processed" in " ".join([refused.value.details()] + [d.message for d in error_details(refused.value)])
    block = writer.submit_prepared(tx_id, endorsed.prepared_transaction, "RecordContribution")
    assert block > 0
    bft_net.clients.wait_for_height(block + 1)
    [recorded] = bft_net.clients.ledger("CoordinatorMSP", chaincode=name).contributions(JOB)
    assert recorded.tx_id == tx_id
