"""The native Fabric network: what the audit trail's trust rests on, checked against real peers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import pytest
from fabric_protos.peer import transaction_pb2

from clinfed.ledger import Contribution
from clinfed.ledger.fabric import CommitFailed
from fabric_network import testing
from fabric_network.network import REPO

JOB = "job-fabric"


def contribution(site: str, round_: int = 0) -> Contribution:
    return Contribution(job_id=JOB, round=round_, site=site,
                        update_sha256=hashlib.sha256(f"{JOB}/{round_}/{site}".encode()).hexdigest(),
                        n_samples=40, metrics={"train_loss": 0.5}, patient_epsilon=1.0, patient_delta=1e-5)


def test_write_endorsed_by_one_org_only_is_rejected_at_validation(fabric_net):
    name = testing.fresh_chaincode(fabric_net)
    lone = fabric_net.clients.ledger("Site1MSP", chaincode=name, endorsing_orgs=["Site1MSP"])
    with pytest.raises(CommitFailed) as err:
        lone.record_contribution(contribution("site-1"))
    assert err.value.code == transaction_pb2.ENDORSEMENT_POLICY_FAILURE
    reader = fabric_net.clients.ledger("CoordinatorMSP", chaincode=name)
    assert reader.contributions(JOB) == []
    # The same write, endorsed as the channel's MAJORITY policy asks (the gateway picks the orgs), commits.
    written = fabric_net.clients.ledger("Site1MSP", chaincode=name, synced=True).record_contribution(contribution("site-1"))
    assert reader.contributions(JOB) == [written]


def test_two_orgs_are_not_a_majority_either(fabric_net):
    name = testing.fresh_chaincode(fabric_net)
    pair = fabric_net.clients.ledger("Site1MSP", chaincode=name, endorsing_orgs=["Site1MSP", "Site2MSP"])
    with pytest.raises(CommitFailed) as err:
        pair.record_contribution(contribution("site-1"))
    assert err.value.code == transaction_pb2.ENDORSEMENT_POLICY_FAILURE


def test_peer_restart_loses_no_record_and_catches_up_on_those_written_while_it_was_down(fabric_net):
    name = testing.fresh_chaincode(fabric_net)
    peer = fabric_net.peer_of("Site3MSP")
    writer = fabric_net.clients.ledger("Site1MSP", chaincode=name, synced=True)
    written = [writer.record_contribution(contribution("site-1", 0))]  # on every peer, Site3's included
    fabric_net.processes.stop(peer)
    try:
        # three of four organisations still make a majority: writes go on without Site3
        written += [writer.record_contribution(contribution("site-1", r)) for r in (1, 2, 3)]
    finally:
        fabric_net.processes.start(peer)
    own_peer_only = fabric_net.clients.ledger("Site3MSP", chaincode=name, endorsing_orgs=["Site3MSP"])
    deadline, seen = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        try:
            seen = own_peer_only.contributions(JOB)
        except Exception:  # noqa: BLE001 - the restarted peer may not serve yet
            seen = None
        if seen == written:
            break
        time.sleep(0.5)
    assert seen == written


def test_network_status_from_the_command_line(fabric_net):
    result = subprocess.run([sys.executable, "-m", "fabric_network", "--root", str(fabric_net.root), "status"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["consensus"] == "raft"
    assert all(n["running"] for n in status["nodes"].values())
    kinds = sorted(n["kind"] for n in status["nodes"].values())
    assert kinds == ["chaincode"] * 4 + ["orderer"] + ["peer"] * 4
    # every node listens in the network's own loopback block
    assert all(n["address"].startswith(fabric_net.spec.block + ".") for n in status["nodes"].values())


def test_install_is_pinned_and_reused_from_the_cache(fabric_net):
    started = time.monotonic()
    result = subprocess.run(["bash", str(REPO / "fabric_network" / "install.sh")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 5  # nothing rebuilt
    home = result.stdout.strip().splitlines()[-1]
    assert home == str(fabric_net.home)
    version = subprocess.run([f"{home}/bin/peer", "version"], capture_output=True, text=True, timeout=30).stdout
    assert "Version: 3.1.5" in version and "Commit SHA: 86c1172" in version
