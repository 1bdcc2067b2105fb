"""SmartBFT ordering: four orderers tolerate one faulty (here: stopped) orderer."""

from __future__ import annotations

import time

from fabric_network import testing
from test_fabric_network import JOB, contribution


def test_bft_commits_with_one_of_four_orderers_stopped(bft_net):
    assert len(bft_net.orderers) == 4
    name = testing.fresh_chaincode(bft_net)
    writer = bft_net.ledger("Site1MSP", chaincode=name)
    first = writer.record_contribution(contribution("site-1", 0))
    bft_net.stop_node(bft_net.orderers[-1])
    started = time.monotonic()
    second = writer.record_contribution(contribution("site-1", 1))
    assert time.monotonic() - started < 60
    assert bft_net.ledger("CoordinatorMSP", chaincode=name).contributions(JOB) == [first, second]


def test_bft_submit_answered_request_already_processed_reports_success(bft_net):
    """The same endorsed transaction submitted twice: BFT orderers answer the second "request
    already processed" (hyperledger/fabric#4415); the client asks CommitStatus, finds the
    transaction VALID and reports success instead of a failure."""
    import json

    name = testing.fresh_chaincode(bft_net)
    writer = bft_net.ledger("Site1MSP", chaincode=name)
    signed = writer.sign_request("RecordContribution", json.dumps(contribution("site-1", 7).to_request()))
    from clinfed.ledger.fabric import _proposal_ids
    from fabric_protos.gateway import gateway_pb2

    tx_id, _ = _proposal_ids(signed.proposal_bytes)
    endorsed = writer._gateway().Endorse(gateway_pb2.EndorseRequest(
        transaction_id=tx_id, channel_id=writer.channel, proposed_transaction=signed), timeout=30)
    writer._gateway().Submit(writer.submit_request(tx_id, endorsed.prepared_transaction), timeout=30)
    block = writer.submit_prepared(tx_id, endorsed.prepared_transaction, "RecordContribution")
    assert block > 0
    [recorded] = bft_net.ledger("CoordinatorMSP", chaincode=name).contributions(JOB)
    assert recorded.tx_id == tx_id
