"""Where a network's nodes listen: each network leases a block of loopback addresses of its own.

Every organisation is a host with an address of its own (its peer and its chaincode service
listen there), and so is every orderer; each node uses Fabric's usual fixed ports. Picking
free ports by binding port 0 and closing the socket races: the port is free again until the
node binds it minutes later, and the kernel hands ephemeral ports to any outgoing connection
in the meantime. Addresses in ``127.77.B.0/24`` are never the source of a connection (the
kernel picks ``127.0.0.1`` for loopback traffic), so nobody takes them by accident; the lease
file, made under an exclusive lock, keeps two of our networks out of each other's block. A
block is also probed before it is leased, so one still used by processes of a crashed run is
skipped rather than shared.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import FabricNetworkError

PREFIX = "127.77"  # a /16 of the loopback /8 for clinfed networks; one /24 per network

# Fabric's usual ports. Peer and chaincode service share their organisation's address.
ORDERER_PORTS = {"listen": 7050, "admin": 7053, "operations": 9443}
PEER_PORTS = {"listen": 7051, "chaincode": 7052, "operations": 9444}
CHAINCODE_PORTS = {"listen": 9999}


def lease_dir() -> Path:
    """Where leases live: ``CLINFED_FABRIC_LEASES`` or ``<tmp>/clinfed-fabric-leases``, shared by
    every user of this machine's loopback."""
    return Path(os.environ.get("CLINFED_FABRIC_LEASES") or Path(tempfile.gettempdir()) / "clinfed-fabric-leases")


@contextlib.contextmanager
def _locked():
    directory = lease_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield directory
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lease_block(root: str | os.PathLike, endpoints: Callable[[str], Iterable[tuple[str, int]]]) -> str:
    """Lease a free block ``127.77.B`` for the network in ``root``; returns the block.

    ``endpoints(block)`` lists the (address, port) pairs the network will listen on in that block;
    each must bind now, or the block is skipped. A lease whose network folder is gone (or holds
    another network) is stale and is taken over."""
    root = str(Path(root).resolve())
    with _locked() as directory:
        for b in range(1, 255):
            block = f"{PREFIX}.{b}"
            lease = directory / block
            holder = _holder(lease)
            if holder is not None and holder != root and _in_use(lease, block):
                continue
            busy = _first_busy(endpoints(block))
            if busy is not None:
                continue
            lease.write_text(json.dumps({"root": root, "pid": os.getpid()}))
            return block
    raise FabricNetworkError(f"no free loopback block {PREFIX}.1-254 (leases in {lease_dir()}): stop other networks "
                       f"with `python -m fabric_network down --root DIR`")


def release_block(block: str, root: str | os.PathLike) -> None:
    """Give ``block`` back, if the lease is ``root``'s."""
    root = str(Path(root).resolve())
    with _locked() as directory:
        lease = directory / block
        if _holder(lease) == root:
            lease.unlink()


def leased_to(block: str) -> str | None:
    """The network folder that holds ``block``'s lease, if any."""
    return _holder(lease_dir() / block)


def _holder(lease: Path) -> str | None:
    try:
        return json.loads(lease.read_text())["root"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FabricNetworkError(f"{lease}: unreadable address lease ({exc}); delete it if no network uses "
                           f"{lease.name}") from exc


def _in_use(lease: Path, block: str) -> bool:
    """Whether the lease's network still holds ``block``: its folder describes a network on it, or
    has no description yet while the process that leased it runs (it writes ``network.json`` after
    the lease, outside the lock; another process must not take the block in between)."""
    record = json.loads(lease.read_text())
    root = Path(record["root"])
    try:
        return json.loads((root / "network.json").read_text()).get("block") == block
    except FileNotFoundError:
        return root.is_dir() and _running(record.get("pid"))
    except (OSError, ValueError):
        return False


def _running(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _first_busy(endpoints: Iterable[tuple[str, int]]) -> tuple[str, int] | None:
    for host, port in endpoints:
        with socket.socket() as probe:
            # as the nodes bind (Go and gRPC set SO_REUSEADDR): connections of a network that is
            # gone, still in TIME_WAIT, do not keep the block busy; a bound or listening socket does
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise FabricNetworkError(f"cannot bind {host}: this machine's loopback does not take "
                                       f"{PREFIX}.0.0/16 ({exc})") from exc
                return host, port
    return None
