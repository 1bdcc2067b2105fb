"""A real Fabric network for the tests in this folder: started once per session from the cached
binaries (built on first use), stopped at the end. If it cannot be started the tests fail with
the reason. Tests that need no network (address leases) run in `make test`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
for path in (REPO, REPO / "chaincode"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fabric_network import FabricNetworkError, testing  # noqa: E402


FABRIC_FIXTURES = {"fabric_net", "bft_net"}


def pytest_collection_modifyitems(items):
    """A test here that uses a network needs the native binaries: `make test-fabric` (marker `fabric`)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents and FABRIC_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.fabric)


def _network(consensus: str):
    try:
        return testing.shared_network(consensus)
    except FabricNetworkError as exc:
        pytest.fail(f"the Fabric network ({consensus}) could not be started: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def fabric_net():
    """The session's Raft network: 1 orderer, Coordinator + 3 sites (each with its own peer and
    chaincode service) + an outsider org without a peer."""
    yield _network("raft")
    testing.stop_shared("raft")


@pytest.fixture(scope="module")
def bft_net():
    """A 4-orderer SmartBFT network, only for the module that asks for it."""
    yield _network("bft")
    testing.stop_shared("bft")
