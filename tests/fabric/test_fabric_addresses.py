"""Each network leases a loopback block of its own before any node binds (no Fabric binaries needed)."""

from __future__ import annotations

import json
import multiprocessing
import socket

import pytest

from fabric_network import FabricNetworkError, addresses

PORTS = [7050, 7051]


def endpoints(block):
    return [(f"{block}.1", port) for port in PORTS]


@pytest.fixture(autouse=True)
def private_leases(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINFED_FABRIC_LEASES", str(tmp_path / "leases"))


def network_folder(tmp_path, name, block=None):
    root = tmp_path / name
    root.mkdir()
    if block:
        (root / "network.json").write_text(json.dumps({"block": block}))
    return root


def test_two_networks_get_different_blocks_and_a_released_block_is_reused(tmp_path):
    a, b = network_folder(tmp_path, "a"), network_folder(tmp_path, "b")
    first = addresses.lease_block(a, endpoints)
    (a / "network.json").write_text(json.dumps({"block": first}))
    second = addresses.lease_block(b, endpoints)
    assert first != second and addresses.leased_to(first) == str(a) and addresses.leased_to(second) == str(b)
    addresses.release_block(first, a)
    assert addresses.leased_to(first) is None
    assert addresses.lease_block(network_folder(tmp_path, "c"), endpoints) == first


def test_a_block_someone_listens_on_is_skipped(tmp_path):
    free = addresses.lease_block(network_folder(tmp_path, "probe"), endpoints)
    addresses.release_block(free, tmp_path / "probe")
    with socket.socket() as squatter:  # a process outside our leases, e.g. left over from a crashed run
        squatter.bind((f"{free}.1", PORTS[1]))
        squatter.listen()
        got = addresses.lease_block(network_folder(tmp_path, "n"), endpoints)
    assert got != free


def test_a_stale_lease_is_taken_over_but_a_live_one_is_not(tmp_path):
    live = network_folder(tmp_path, "live")
    block = addresses.lease_block(live, endpoints)
    (live / "network.json").write_text(json.dumps({"block": block}))
    other = addresses.lease_block(network_folder(tmp_path, "other"), endpoints)
    assert other != block
    addresses.release_block(other, tmp_path / "other")
    gone = network_folder(tmp_path, "gone")
    stale = addresses.lease_block(gone, endpoints)  # leased, then the folder was deleted without `down`
    gone.rmdir()
    assert addresses.lease_block(network_folder(tmp_path, "next"), endpoints) == stale


def test_a_corrupt_lease_is_named_in_the_error(tmp_path):
    block = addresses.lease_block(network_folder(tmp_path, "a"), endpoints)
    (addresses.lease_dir() / block).write_text("{not json")
    with pytest.raises(FabricNetworkError, match=f"{block}: unreadable address lease"):
        addresses.lease_block(network_folder(tmp_path, "b"), endpoints)


def _lease_in_child(root, queue):
    block = addresses.lease_block(root, endpoints)
    (root / "network.json").write_text(json.dumps({"block": block}))
    queue.put(block)


def test_concurrent_processes_never_share_a_block(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    children = [context.Process(target=_lease_in_child, args=(network_folder(tmp_path, f"n{i}"), queue))
                for i in range(6)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    blocks = [queue.get(timeout=5) for _ in children]
    assert len(set(blocks)) == len(blocks)


def test_a_block_leased_but_not_yet_described_is_not_taken_while_its_process_runs(tmp_path):
    # The holder writes network.json after the lease, outside the lock: in between, the lease is live.
    setting_up = addresses.lease_block(network_folder(tmp_path, "setting-up"), endpoints)
    assert addresses.lease_block(network_folder(tmp_path, "other"), endpoints) != setting_up


def test_a_block_leased_by_a_process_that_died_before_describing_it_is_taken_over(tmp_path):
    dead = multiprocessing.get_context("spawn").Process(target=int)
    dead.start()
    dead.join(60)
    crashed = network_folder(tmp_path, "crashed")
    block = addresses.lease_block(crashed, endpoints)
    (addresses.lease_dir() / block).write_text(json.dumps({"root": str(crashed.resolve()), "pid": dead.pid}))
    assert addresses.lease_block(network_folder(tmp_path, "next"), endpoints) == block
