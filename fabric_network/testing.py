"""The Fabric network as test sessions use it: one network per test process, started on first use
and stopped at exit, with a fresh chaincode namespace (a new chaincode definition on the same
installed package) for every test that needs an empty ledger.

A test that needs Fabric fails, with the build's or the network's own words, when the network
cannot be brought up. These tests carry the pytest marker ``fabric`` (``make test-fabric``).
"""

from __future__ import annotations

import atexit
import itertools
import shutil
import sys
import tempfile
import threading
import time

from .binaries import DEFAULT_VERSION, install, installed_home
from .errors import FabricNetworkError
from .network import Network

OBSERVER = "outsider"  # a channel member that is neither a site nor the coordinator: OutsiderMSP

_lock = threading.Lock()
_networks: dict = {}
_names = itertools.count(1)


def fabric_home(version: str = DEFAULT_VERSION):
    """The cached install, building it first when needed (minutes, once per machine)."""
    home = installed_home(version)
    if home is None:
        started = time.monotonic()
        print(f"\nfabric_network: building Fabric {version} binaries (cold; cached afterwards)...", file=sys.stderr)
        home = install(version, quiet=True)
        print(f"fabric_network: built in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return home


def start_network(consensus: str = "raft", **kwargs) -> Network:
    """A new network in a temporary folder, stopped and deleted at interpreter exit at the latest."""
    home = fabric_home()
    root = tempfile.mkdtemp(prefix=f"clinfed-fabric-{consensus}-")
    # Peers keep their default 15 min time window; the contract's own clock-skew limit (5 min) is
    # the one the shared suite checks.
    net = Network.create(root, consensus=consensus, observers=[OBSERVER], **kwargs)
    net.spec.fabric_home = str(home)
    atexit.register(_down_quietly, net)
    try:
        net.up(log=lambda m: print(f"fabric_network ({consensus}): {m}", file=sys.stderr))
    except FabricNetworkError as exc:
        logs = net.root / "logs"
        kept = shutil.copytree(logs, tempfile.mkdtemp(prefix="clinfed-fabric-failed-") + "/logs") \
            if logs.is_dir() else None
        _down_quietly(net)
        raise FabricNetworkError(f"{exc}" + (f" (the nodes' logs are kept in {kept})" if kept else "")) from exc
    except BaseException:
        _down_quietly(net)
        raise
    return net


def shared_network(consensus: str = "raft") -> Network:
    """The one network of this process for ``consensus``; a failure to start is remembered and re-raised."""
    with _lock:
        known = _networks.get(consensus)
        if isinstance(known, Network):
            return known
        if isinstance(known, FabricNetworkError):
            raise FabricNetworkError(f"(as before) {known}")
        try:
            _networks[consensus] = start_network(consensus)
        except FabricNetworkError as exc:
            _networks[consensus] = exc
            raise
        return _networks[consensus]


_ready: dict = {}  # network root -> chaincode names defined and initialised, not yet handed out
POOL_BATCH = 12


def fresh_chaincode(net: Network) -> str:
    """A new, initialised chaincode namespace on ``net`` (same package, so the same contract).

    Names are defined in batches through the Gateway (one block of approvals, one of commits,
    one of InitConsortium), so a fresh namespace costs a fraction of a second per test."""
    with _lock:
        ready = _ready.setdefault(str(net.root), [])
        if not ready:
            names = [f"{net.spec.chaincode}-t{next(_names)}" for _ in range(POOL_BATCH)]
            net.chaincode.define(names)
            net.parallel([lambda n=n: net.chaincode.init_consortium(n) for n in names])
            ready.extend(names)
        return ready.pop(0)


def fabric_consortium_parts():
    """``open(msp_id, clock=None)``, ``open_with(identity)`` and ``identity(msp_id)`` for the shared
    ledger suite, on a fresh namespace of the session's Raft network."""
    from clinfed.ledger.fabric import FabricLedger
    from clinfed.ledger.identity import load_msp_identity

    net = shared_network("raft")
    open_as = fabric_opener(net)
    name = open_as.chaincode

    def open_with(identity):
        try:
            peer = net.peer_of(identity.msp_id)
        except FabricNetworkError:
            peer = net.peer_of(net.coordinator_msp)
        return FabricLedger(net.address(peer), identity, channel=net.spec.channel, chaincode=name,
                            tls_root_cert=str(net.tls_ca(net.spec.nodes[peer]["org"])))

    def identity(msp_id):
        return load_msp_identity(net.user_dir(msp_id[:-3]) / "msp", msp_id)

    return open_as, open_with, identity


def fabric_opener(net: Network | None = None):
    """``open(msp_id, clock=None)`` for the shared ledger suite: clients of a fresh namespace
    (its name in the function's ``chaincode`` attribute)."""
    net = net or shared_network("raft")
    name = fresh_chaincode(net)
    opened: dict = {}

    # Fabric confirms a commit on the gateway's own peer only; the suite reads one org's write
    # through another org's client (and endorses the next write on other orgs' peers) at once,
    # so its clients return from a write once every peer has committed it.
    def open_as(msp_id: str, clock=None):
        if clock is not None:
            return net.clients.ledger(msp_id, chaincode=name, synced=True, clock=clock)
        if msp_id not in opened:
            opened[msp_id] = net.clients.ledger(msp_id, chaincode=name, synced=True)
        return opened[msp_id]

    open_as.chaincode = name
    return open_as


def stop_shared(consensus: str) -> None:
    """Stop and delete the shared network of ``consensus``, if one was started."""
    with _lock:
        known = _networks.pop(consensus, None)
    if isinstance(known, Network):
        _ready.pop(str(known.root), None)
        _down_quietly(known)


def _down_quietly(net: Network) -> None:
    try:
        net.down()
    except Exception as exc:  # noqa: BLE001 - at exit, report and go on
        print(f"fabric_network: stopping {net.root} failed: {exc}", file=sys.stderr)
