"""A native (no Docker) Hyperledger Fabric network for the clinfed audit channel, on loopback.

One orderer organisation (a single Raft orderer, or four SmartBFT orderers), the coordinator's
organisation and one organisation per hospital site, each with one peer (LevelDB, TLS on) and
its own chaincode service: every organisation runs the contract itself, from a package of its
own, so what one organisation's contract says counts only as that organisation's endorsement.
The channel is created through the orderers' channel participation API (``osnadmin``); there is
no system channel.

This module holds the network's shape (who the nodes are, where they listen, where their files
are) and brings it up and down; the work is done by one module per concern:

* :mod:`.generate`: crypto material (cryptogen), node configs, ``configtx.yaml`` and the channel's genesis block;
* :mod:`.processes`: starting, watching and stopping the node processes;
* :mod:`.lifecycle`: chaincode packages, install, approval, commit and the consortium's initialisation;
* :mod:`.clients`: :class:`clinfed.ledger.FabricLedger` clients for an organisation, and chain heights;
* :mod:`.addresses`: each network's own block of loopback addresses.

Everything the network writes (crypto material, configs, ledgers, logs, the process IDs) lives
under one folder, described by its ``network.json``, so ``python -m fabric_network status|down``
work from another process.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clinfed.ledger.settings import COORDINATOR, msp_id_for  # one naming convention for MSP IDs: clinfed's

from . import addresses
from .binaries import DEFAULT_VERSION, install
from .clients import LedgerClients
from .errors import FabricNetworkError
from .lifecycle import ChaincodeLifecycle
from .processes import Supervisor

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SITES = ("site-1", "site-2", "site-3")


def org_name_for(participant: str) -> str:
    return msp_id_for(participant)[:-3]


@dataclass
class Node:
    name: str            # e.g. peer0.site1.clinfed
    kind: str            # "peer", "orderer" or "chaincode"
    org: str             # org name (Site1, Orderer, ...)
    host: str            # the address it listens on
    ports: dict = field(default_factory=dict)
    pid: int | None = None


@dataclass
class Spec:
    root: str
    sites: list = field(default_factory=lambda: list(DEFAULT_SITES))
    consensus: str = "raft"                 # "raft" (one orderer) or "bft" (four SmartBFT orderers)
    observers: list = field(default_factory=list)  # channel member orgs with no peer and no consortium role
    channel: str = "clinfed"
    chaincode: str = "clinfed"
    batch_timeout: str = "200ms"
    max_message_count: int = 100
    auth_timewindow: str = "15m"             # how far a proposal's timestamp may be from the peer's clock
    version: str = DEFAULT_VERSION
    fabric_home: str = ""
    block: str = ""                          # the leased loopback block, 127.77.B
    package_ids: dict = field(default_factory=dict)  # org -> the package ID its peer installed
    nodes: dict = field(default_factory=dict)   # name -> Node as dict
    chaincodes: list = field(default_factory=list)  # committed chaincode definitions (names)


class Network:
    """A Fabric network under ``root``. Build one with :meth:`create`, reopen it with :meth:`load`.

    ``processes``, ``chaincode`` and ``clients`` do the work of their modules on this network."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.root = Path(spec.root)
        self.processes = Supervisor(self)
        self.chaincode = ChaincodeLifecycle(self)
        self.clients = LedgerClients(self)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, root: str | os.PathLike, *, sites=DEFAULT_SITES, consensus: str = "raft", observers=(),
               channel: str = "clinfed", chaincode: str = "clinfed", batch_timeout: str = "200ms",
               auth_timewindow: str = "15m", version: str = DEFAULT_VERSION) -> "Network":
        """The network's shape, with a loopback block leased for it (nothing started yet)."""
        if consensus not in ("raft", "bft"):
            raise FabricNetworkError(f"consensus must be 'raft' or 'bft', got {consensus!r}")
        if consensus == "bft" and not version.startswith("v3"):
            raise FabricNetworkError(f"BFT ordering needs Fabric 3.x; {version} has only Raft")
        sites = list(sites)
        if not sites or len(set(map(msp_id_for, sites))) != len(sites) or COORDINATOR in sites:
            raise FabricNetworkError(f"sites must be distinct, non-empty and not {COORDINATOR!r}: {sites}")
        spec = Spec(root=str(Path(root).resolve()), sites=sites, consensus=consensus, observers=list(observers),
                    channel=channel, chaincode=chaincode, batch_timeout=batch_timeout,
                    auth_timewindow=auth_timewindow, version=version)
        peer_orgs = [org_name_for(p) for p in [COORDINATOR, *sites]]
        n_orderers = 4 if consensus == "bft" else 1

        def nodes(block: str) -> dict:
            out = {}
            for i in range(n_orderers):
                name = f"orderer{i}.orderer.clinfed"
                out[name] = Node(name, "orderer", "Orderer", f"{block}.{1 + i}", dict(addresses.ORDERER_PORTS))
            for j, org in enumerate(peer_orgs):
                host = f"{block}.{11 + j}"
                peer, service = f"peer0.{org.lower()}.clinfed", f"chaincode.{org.lower()}.clinfed"
                out[peer] = Node(peer, "peer", org, host, dict(addresses.PEER_PORTS))
                out[service] = Node(service, "chaincode", org, host, dict(addresses.CHAINCODE_PORTS))
            return out

        spec.block = addresses.lease_block(spec.root, lambda block: [
            (node.host, port) for node in nodes(block).values() for port in node.ports.values()])
        spec.nodes = {name: asdict(node) for name, node in nodes(spec.block).items()}
        return cls(spec)

    @classmethod
    def load(cls, root: str | os.PathLike) -> "Network":
        path = Path(root) / "network.json"
        if not path.is_file():
            raise FabricNetworkError(f"{path}: no network here (run `python -m fabric_network up --root {root}`)")
        return cls(Spec(**json.loads(path.read_text())))

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "network.json.tmp"
        tmp.write_text(json.dumps(asdict(self.spec), indent=2))
        tmp.replace(self.root / "network.json")

    # ------------------------------------------------------------------ names and paths

    def _of_kind(self, kind: str) -> list[str]:
        return [n for n, d in self.spec.nodes.items() if d["kind"] == kind]

    @property
    def orderers(self) -> list[str]:
        return self._of_kind("orderer")

    @property
    def peers(self) -> list[str]:
        return self._of_kind("peer")

    @property
    def chaincode_services(self) -> list[str]:
        return self._of_kind("chaincode")

    @property
    def peer_orgs(self) -> list[str]:
        """The organisations that run a peer (and a chaincode service): coordinator, then sites."""
        return [self.spec.nodes[p]["org"] for p in self.peers]

    def _node_of(self, kind: str, msp_id: str) -> str:
        for name in self._of_kind(kind):
            if self.spec.nodes[name]["org"] + "MSP" == msp_id:
                return name
        raise FabricNetworkError(f"no {kind} of {msp_id} in this network (peer orgs: {', '.join(self.peer_orgs)})")

    def peer_of(self, msp_id: str) -> str:
        return self._node_of("peer", msp_id)

    def chaincode_service_of(self, msp_id: str) -> str:
        return self._node_of("chaincode", msp_id)

    @property
    def sites_to_msp(self) -> dict:
        return {site: msp_id_for(site) for site in self.spec.sites}

    @property
    def coordinator_msp(self) -> str:
        return msp_id_for(COORDINATOR)

    @property
    def app_orgs(self) -> list[str]:
        """Application org names, in channel order: coordinator, sites, observers."""
        return [org_name_for(p) for p in [COORDINATOR, *self.spec.sites, *self.spec.observers]]

    def crypto(self, *parts) -> Path:
        return self.root.joinpath("crypto", *parts)

    @staticmethod
    def domain(org: str) -> str:
        return f"{org.lower()}.clinfed"

    def org_dir(self, org: str) -> Path:
        kind = "ordererOrganizations" if org == "Orderer" else "peerOrganizations"
        return self.crypto(kind, self.domain(org))

    def node_dir(self, name: str) -> Path:
        node = self.spec.nodes[name]
        return self.org_dir(node["org"]) / ("orderers" if node["kind"] == "orderer" else "peers") / name

    def user_dir(self, org: str, user: str = "User1") -> Path:
        return self.org_dir(org) / "users" / f"{user}@{self.domain(org)}"

    def tls_ca(self, org: str) -> Path:
        return self.org_dir(org) / "tlsca" / f"tlsca.{self.domain(org)}-cert.pem"

    def address(self, name: str, port: str = "listen") -> str:
        node = self.spec.nodes[name]
        return f"{node['host']}:{node['ports'][port]}"

    @property
    def block_path(self) -> Path:
        return self.root / "channel" / f"{self.spec.channel}.block"

    @property
    def home(self) -> Path:
        return Path(self.spec.fabric_home)

    def bin(self, tool: str) -> str:
        return str(self.home / "bin" / tool)

    # ------------------------------------------------------------------ the whole network

    def up(self, *, log=print) -> "Network":
        """Install or reuse the binaries, generate everything, start all nodes, create the channel,
        deploy the chaincode and initialise the consortium. On failure every process started is
        stopped again (the folder and its logs stay for reading)."""
        from .generate import generate

        t0 = time.monotonic()
        if not self.spec.fabric_home:
            self.spec.fabric_home = str(install(self.spec.version, quiet=True))
        try:
            generate(self)
            log(f"generated crypto and channel block in {time.monotonic() - t0:.1f} s")
            self.processes.start_all(self.orderers + self.peers)
            log(f"started {len(self.orderers)} orderer(s) and {len(self.peers)} peers in {time.monotonic() - t0:.1f} s")
            self.create_channel()
            log(f"channel {self.spec.channel} joined by all nodes in {time.monotonic() - t0:.1f} s")
            self.chaincode.deploy()
            log(f"chaincode {self.spec.chaincode} deployed by {len(self.chaincode_services)} organisations and "
                f"consortium initialised in {time.monotonic() - t0:.1f} s")
        except BaseException:
            self.stop()
            raise
        return self

    def start(self) -> None:
        """Start the processes of a stopped network again (its data kept)."""
        self.processes.start_all(self.orderers + self.peers + self.chaincode_services)
        self.chaincode.wait_for_membership()

    def stop(self) -> None:
        """Stop every process of this network, keep its folder."""
        for name in list(self.spec.nodes):
            self.processes.stop(name)
        self.clients.close()

    def down(self) -> None:
        """Stop every process, delete the folder and give the address block back."""
        self.stop()
        if self.root.exists() and (self.root / "network.json").exists():
            shutil.rmtree(self.root)
        if self.spec.block:
            addresses.release_block(self.spec.block, self.root)

    def status(self) -> dict:
        out = {"root": str(self.root), "consensus": self.spec.consensus, "channel": self.spec.channel,
               "chaincode": self.spec.chaincode, "package_ids": self.spec.package_ids, "nodes": {}}
        for name, node in self.spec.nodes.items():
            out["nodes"][name] = {"kind": node["kind"], "org": node["org"], "address": self.address(name),
                                  "running": self.processes.is_running(name), "pid": node.get("pid")}
        return out

    def create_channel(self) -> None:
        admin = self.user_dir("Orderer", "Admin") / "tls"
        for name in self.orderers:
            self.run_tool([self.bin("osnadmin"), "channel", "join", "--channelID", self.spec.channel,
                           "--config-block", str(self.block_path), "-o", self.address(name, "admin"),
                           "--ca-file", str(self.tls_ca("Orderer")), "--client-cert", str(admin / "client.crt"),
                           "--client-key", str(admin / "client.key")], f"osnadmin channel join on {name}")
        self.parallel([lambda p=p: self.peer_cli(p, ["channel", "join", "-b", str(self.block_path)],
                                                 f"peer channel join on {p}") for p in self.peers])

    # ------------------------------------------------------------------ tools

    def peer_cli(self, peer: str, args: list[str], what: str, *, timeout: float = 90, retry: bool = False) -> str:
        """``peer <args>`` as the admin of ``peer``'s organisation, against that peer."""
        org = self.spec.nodes[peer]["org"]
        env = {"FABRIC_CFG_PATH": str(self.root / "config"), "CORE_PEER_TLS_ENABLED": "true",
               "CORE_PEER_TLS_ROOTCERT_FILE": str(self.tls_ca(org)), "CORE_PEER_ADDRESS": self.address(peer),
               "CORE_PEER_LOCALMSPID": f"{org}MSP", "CORE_PEER_MSPCONFIGPATH": str(self.user_dir(org, "Admin") / "msp"),
               "FABRIC_LOGGING_SPEC": "WARNING"}
        deadline = time.monotonic() + (30 if retry else 0)
        while True:
            try:
                return self.run_tool([self.bin("peer"), *args], what, env=env, timeout=timeout)
            except FabricNetworkError as exc:
                transient = any(s in str(exc) for s in ("SERVICE_UNAVAILABLE", "no Raft leader", "connection refused",
                                                        "Unavailable", "failed to connect"))
                if not (transient and time.monotonic() < deadline):
                    raise
                time.sleep(0.5)

    def run_tool(self, cmd: list[str], what: str, *, env: dict | None = None, timeout: float = 120) -> str:
        try:
            result = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                                    timeout=timeout, cwd=self.root)
        except subprocess.TimeoutExpired as exc:
            raise FabricNetworkError(f"{what}: timed out after {timeout:.0f} s ({' '.join(cmd)})") from exc
        if result.returncode != 0:
            raise FabricNetworkError(f"{what} failed (exit {result.returncode}): "
                                     f"{(result.stderr or result.stdout).strip()[-3000:]}")
        return result.stdout + result.stderr

    @staticmethod
    def parallel(tasks, workers: int = 16) -> list:
        """Run the callables at once (at most ``workers`` at a time); their results, in order."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(tasks)))) as pool:
            return [f.result() for f in [pool.submit(t) for t in tasks]]
