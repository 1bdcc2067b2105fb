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
