"""Hosts for a trial on one machine: each participant in a Linux network namespace of its own.

The stand-in for hospitals on separate hosts. Every participant (the FLARE server, each site)
gets a network namespace with one interface and one address of its own, and its processes see
only that network: its ``localhost`` is its own, and it reaches the others only at their
addresses, over a bridge. The server's address is the one the startup kits dial
(``coordinator.host`` in consortium.yml, an IPv4 address: FLARE writes it into the server
certificate as an IP SAN), so TLS checks the same name it would in production. The bridge, in
this machine's own namespace, takes the subnet's ``.1``, so the lead's admin console and the
tests reach the server from here. Sites take ``.11``, ``.12``, ... in the order of the
consortium file. Addresses stay on this machine.

Namespaces, the bridge and the links are made with iproute2 (``ip``), which needs root (or
CAP_NET_ADMIN); files stay shared, so a local ledger file is reachable from every namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clinfed.errors import ClinfedError

PLACEMENT_FILE = "namespaces.json"
FIRST_SITE_HOST = 11


class NamespaceError(ClinfedError):
    """Network namespaces for a trial could not be made, read or removed (the message says why)."""


@dataclass
class Host:
    netns: str
    address: str
    link: str  # the veth end on the bridge, in this machine's namespace


@dataclass
class Placement:
    """Where each participant of a trial runs: ``hosts[name]`` (see :class:`Host`)."""

    subnet: str      # "10.213.7" for 10.213.7.0/24
    bridge: str
    hosts: dict = field(default_factory=dict)

    def host(self, name: str) -> Host:
        return Host(**self.hosts[name])

    def command_prefix(self, name: str) -> list[str]:
        """What to put before a command to run it on ``name``'s host."""
        return ["ip", "netns", "exec", self.hosts[name]["netns"]]


def plan(server: str, server_address: str, sites: list[str]) -> Placement:
    """The placement of a trial whose kits dial ``server_address``: the server there, the sites
    beside it in its /24."""
    try:
        address = ipaddress.IPv4Address(server_address)
    except ValueError:
        raise NamespaceError(f"coordinator.host is {server_address!r}: a trial in network namespaces needs an "
                             f"IPv4 address there (e.g. 10.213.7.10), which becomes the server's own address "
                             f"and its certificate's name") from None
    subnet = ".".join(str(address).split(".")[:3])
    last = int(str(address).split(".")[3])
    site_hosts = [h for h in range(FIRST_SITE_HOST, 255) if h != last][:len(sites)]
    if last in (0, 1, 255) or len(site_hosts) < len(sites):
        raise NamespaceError(f"coordinator.host {server_address}: its /24 has no room for the server and "
                             f"{len(sites)} sites (.1 is the bridge, .{FIRST_SITE_HOST} on the sites)")
    tag = subnet.split(".")[2]
    placement = Placement(subnet=subnet, bridge=f"clf{tag}br")
    for i, (name, host) in enumerate([(server, last), *zip(sites, site_hosts)]):
        placement.hosts[name] = asdict(Host(netns=f"clf{tag}-{name}", address=f"{subnet}.{host}", link=f"clf{tag}v{i}"))
    return placement


def create(placement: Placement) -> None:
    """Make the bridge, and for each participant its namespace, link and address. Refuses a subnet
    this machine already routes (the trial would capture or shadow real traffic)."""
    _require_ip()
    network = ipaddress.IPv4Network(f"{placement.subnet}.0/24")
    routes = _ip("-4", "-j", "route", "show", "table", "all")
    for route in json.loads(routes or "[]"):
        dst = route.get("dst", "")
        if dst not in ("", "default") and "/" in dst and ipaddress.IPv4Network(dst, strict=False).overlaps(network):
            raise NamespaceError(f"{network} is already routed on this machine ({dst} dev {route.get('dev')}); "
                                 f"choose a coordinator.host in another /24")
    made = []
    try:
        _ip("link", "add", placement.bridge, "type", "bridge")
        made.append(("link", placement.bridge))
        _ip("addr", "add", f"{placement.subnet}.1/24", "dev", placement.bridge)
        _ip("link", "set", placement.bridge, "up")
        for host in [Host(**h) for h in placement.hosts.values()]:
            _ip("netns", "add", host.netns)
            made.append(("netns", host.netns))
            inner = host.link + "p"
            _ip("link", "add", host.link, "type", "veth", "peer", "name", inner)
            made.append(("link", host.link))
            _ip("link", "set", host.link, "master", placement.bridge, "up")
            _ip("link", "set", inner, "netns", host.netns)
            _ip("-n", host.netns, "link", "set", inner, "name", "eth0")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
    except NamespaceError:
        _remove(made)
        raise


def destroy(placement: Placement) -> None:
    """Remove the namespaces (their links go with them) and the bridge; what is gone already is skipped."""
    _require_ip()
    _remove([("link", placement.bridge)] + [("netns", h["netns"]) for h in placement.hosts.values()])


def save(placement: Placement, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PLACEMENT_FILE).write_text(json.dumps(asdict(placement), indent=2))


def load(run_dir: Path) -> Placement | None:
    """The trial's placement, or None for a trial on this machine's own network."""
    path = run_dir / PLACEMENT_FILE
    if not path.is_file():
        return None
    try:
        return Placement(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise NamespaceError(f"{path}: unreadable placement ({exc})") from exc


def forget(run_dir: Path) -> None:
    (run_dir / PLACEMENT_FILE).unlink(missing_ok=True)


def netns_of_process(pid: int) -> str:
    """The network namespace ``pid`` runs in, as ``net:[inode]``."""
    return os.readlink(f"/proc/{pid}/ns/net")


def netns_id(netns: str) -> str:
    """A named namespace's identity, as :func:`netns_of_process` reports it."""
    return f"net:[{os.stat(f'/run/netns/{netns}').st_ino}]"


def _require_ip() -> None:
    if shutil.which("ip") is None:
        raise NamespaceError("the 'ip' command (iproute2) is not installed; a trial in network namespaces needs it")
    if os.geteuid() != 0:
        raise NamespaceError("making network namespaces needs root (or CAP_NET_ADMIN); run as root, or run the "
                             "trial on this machine's own network (without --netns)")


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def _ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def _remove(made: list) -> None:
    """Delete what ``made`` lists, last first; what is gone already (a veth goes with its
    namespace) is skipped."""
    namespaces = set(_ip("netns", "list").split())
    errors = []
    for kind, name in reversed(made):
        exists = name in namespaces if kind == "netns" else _link_exists(name)
        if not exists:
            continue
        try:
            _ip(*(("netns", "del", name) if kind == "netns" else ("link", "del", name)))
        except NamespaceError as exc:
            errors.append(str(exc))
    if errors:
        raise NamespaceError("; ".join(errors))
