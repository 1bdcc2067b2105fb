"""A native (no Docker) Hyperledger Fabric network for the clinfed audit channel, on 127.0.0.1.

One orderer organisation (a single Raft orderer, or four SmartBFT orderers), the coordinator's
organisation and one organisation per hospital site, each with one peer (LevelDB, TLS on). The
channel is created through the orderers' channel participation API (``osnadmin``); there is no
system channel. The clinfed contract runs as a chaincode service (CCaaS): the package holds only
a ``connection.json``, every peer installs the same package bytes, each organisation approves,
and the definition is committed with an endorsement policy that needs several organisations.

Everything the network writes (crypto material, configs, ledgers, logs, the process IDs) lives
under one folder, described by its ``network.json``, so ``python -m fabric_network status|down``
work from another process.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from clinfed.ledger.settings import COORDINATOR, msp_id_for  # one naming convention for MSP IDs: clinfed's

REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = Path(__file__).resolve().parent / "install.sh"
DEFAULT_VERSION = "v3.1.5"
DEFAULT_SITES = ("site-1", "site-2", "site-3")
CONTRACT_LABEL = "clinfed_1.0"
HOST = "127.0.0.1"
SANS = [HOST, "localhost"]

# Endorsement policies a chaincode definition can name (see README: why MAJORITY is the default).
ENDORSEMENT_POLICIES = ("majority", "any2")


class FabricNetworkError(Exception):
    """A step of bringing the network up or down failed; the message says which and where the log is."""


def org_name_for(participant: str) -> str:
    return msp_id_for(participant)[:-3]


# ---------------------------------------------------------------------- binaries


def install(version: str = DEFAULT_VERSION, *, quiet: bool = False) -> Path:
    """Build (or reuse) the pinned Fabric binaries; returns the install folder (``bin/``, ``config/``,
    ``builders/ccaas``). Raises :class:`FabricNetworkError` with the build's own words on failure."""
    env = dict(os.environ, FABRIC_VERSION=version)
    result = subprocess.run(["bash", str(INSTALL_SCRIPT)], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=None if not quiet else subprocess.PIPE)
    if result.returncode != 0:
        detail = (result.stderr or "").strip() if quiet else "(see the output above)"
        raise FabricNetworkError(f"fabric_network/install.sh failed (exit {result.returncode}): {detail}")
    return Path(result.stdout.strip().splitlines()[-1])


COMMITS = {"v3.1.5": "86c1172bec37e6590c6b1ae6f847833df48d65fc", "v2.5.16": "f871cf92a026aba7b12e6f06d71ded3e6e659d71"}


def installed_home(version: str = DEFAULT_VERSION) -> Path | None:
    """The install folder if a complete install of ``version`` is cached (install.sh's layout), else None."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    home = Path(os.environ.get("CLINFED_FABRIC_HOME") or cache / "clinfed" / "fabric" / version)
    return home if (home / f".installed-{COMMITS[version]}").is_file() else None


# ---------------------------------------------------------------------- layout


@dataclass
class Node:
    name: str            # e.g. peer0.site1.clinfed
    kind: str            # "peer", "orderer" or "chaincode"
    org: str             # org name (Site1, Orderer, ...)
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
    endorsement: str = "majority"
    auth_timewindow: str = "15m"             # how far a proposal's timestamp may be from the peer's clock
    version: str = DEFAULT_VERSION
    fabric_home: str = ""
    package_id: str = ""
    nodes: dict = field(default_factory=dict)   # name -> Node as dict
    chaincodes: list = field(default_factory=list)  # committed chaincode definitions (names)


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


class Network:
    """A Fabric network under ``root``. Build one with :meth:`create`, reopen it with :meth:`load`."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.root = Path(spec.root)
        self._processes: dict = {}
        self._height_clients: dict = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, root: str | os.PathLike, *, sites=DEFAULT_SITES, consensus: str = "raft", observers=(),
               channel: str = "clinfed", chaincode: str = "clinfed", batch_timeout: str = "200ms",
               endorsement: str = "majority", auth_timewindow: str = "15m",
               version: str = DEFAULT_VERSION) -> "Network":
        if consensus not in ("raft", "bft"):
            raise FabricNetworkError(f"consensus must be 'raft' or 'bft', got {consensus!r}")
        if endorsement not in ENDORSEMENT_POLICIES:
            raise FabricNetworkError(f"endorsement must be one of {', '.join(ENDORSEMENT_POLICIES)}, got {endorsement!r}")
        if consensus == "bft" and not version.startswith("v3"):
            raise FabricNetworkError(f"BFT ordering needs Fabric 3.x; {version} has only Raft")
        sites = list(sites)
        if not sites or len(set(map(msp_id_for, sites))) != len(sites) or COORDINATOR in sites:
            raise FabricNetworkError(f"sites must be distinct, non-empty and not {COORDINATOR!r}: {sites}")
        spec = Spec(root=str(Path(root).resolve()), sites=sites, consensus=consensus, observers=list(observers),
                    channel=channel, chaincode=chaincode, batch_timeout=batch_timeout, endorsement=endorsement,
                    auth_timewindow=auth_timewindow, version=version)
        n_orderers = 4 if consensus == "bft" else 1
        peer_orgs = [org_name_for(p) for p in [COORDINATOR, *sites]]
        ports = iter(_free_ports(3 * n_orderers + 3 * len(peer_orgs) + 1))
        for i in range(n_orderers):
            name = f"orderer{i}.orderer.clinfed"
            spec.nodes[name] = asdict(Node(name, "orderer", "Orderer",
                                           {"listen": next(ports), "admin": next(ports), "operations": next(ports)}))
        for org in peer_orgs:
            name = f"peer0.{org.lower()}.clinfed"
            spec.nodes[name] = asdict(Node(name, "peer", org,
                                           {"listen": next(ports), "chaincode": next(ports), "operations": next(ports)}))
        spec.nodes["chaincode"] = asdict(Node("chaincode", "chaincode", "Chaincode", {"listen": next(ports)}))
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

    @property
    def orderers(self) -> list[str]:
        return [n for n, d in self.spec.nodes.items() if d["kind"] == "orderer"]

    @property
    def peers(self) -> list[str]:
        return [n for n, d in self.spec.nodes.items() if d["kind"] == "peer"]

    def peer_of(self, msp_id: str) -> str:
        for name in self.peers:
            if self.spec.nodes[name]["org"] + "MSP" == msp_id:
                return name
        raise FabricNetworkError(f"no peer of {msp_id} in this network (peers: {', '.join(self.peers)})")

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

    def org_dir(self, org: str) -> Path:
        if org == "Orderer":
            return self.crypto("ordererOrganizations", "orderer.clinfed")
        return self.crypto("peerOrganizations", f"{org.lower()}.clinfed")

    def node_dir(self, name: str) -> Path:
        node = self.spec.nodes[name]
        if node["kind"] == "orderer":
            return self.org_dir("Orderer") / "orderers" / name
        if node["kind"] == "chaincode":
            return self.org_dir("Chaincode") / "peers" / "server.chaincode.clinfed"
        return self.org_dir(node["org"]) / "peers" / name

    def user_dir(self, org: str, user: str = "User1") -> Path:
        domain = "orderer.clinfed" if org == "Orderer" else f"{org.lower()}.clinfed"
        return self.org_dir(org) / "users" / f"{user}@{domain}"

    def tls_ca(self, org: str) -> Path:
        domain = "orderer.clinfed" if org == "Orderer" else f"{org.lower()}.clinfed"
        return self.org_dir(org) / "tlsca" / f"tlsca.{domain}-cert.pem"

    def address(self, name: str, port: str = "listen") -> str:
        return f"{HOST}:{self.spec.nodes[name]['ports'][port]}"

    @property
    def block_path(self) -> Path:
        return self.root / "channel" / f"{self.spec.channel}.block"

    @property
    def home(self) -> Path:
        return Path(self.spec.fabric_home)

    def bin(self, tool: str) -> str:
        return str(self.home / "bin" / tool)

    # ------------------------------------------------------------------ lifecycle of the whole network

    def up(self, *, log=print) -> "Network":
        """Install or reuse the binaries, generate everything, start all nodes, create the channel,
        deploy the chaincode and initialise the consortium."""
        t0 = time.monotonic()
        if not self.spec.fabric_home:
            self.spec.fabric_home = str(install(self.spec.version, quiet=True))
        self.generate()
        log(f"generated crypto and channel block in {time.monotonic() - t0:.1f} s")
        self.start_all()
        log(f"started {len(self.orderers)} orderer(s) and {len(self.peers)} peers in {time.monotonic() - t0:.1f} s")
        self.create_channel()
        log(f"channel {self.spec.channel} joined by all nodes in {time.monotonic() - t0:.1f} s")
        self.deploy()
        log(f"chaincode {self.spec.chaincode} deployed and consortium initialised in {time.monotonic() - t0:.1f} s")
        return self

    def down(self, *, purge: bool = True) -> None:
        """Stop every process this network started; with ``purge`` also delete its folder."""
        for name in list(self.spec.nodes):
            self.stop_node(name)
        if purge and self.root.exists() and (self.root / "network.json").exists():
            shutil.rmtree(self.root)

    def status(self) -> dict:
        out = {"root": str(self.root), "consensus": self.spec.consensus, "channel": self.spec.channel,
               "chaincode": self.spec.chaincode, "package_id": self.spec.package_id, "nodes": {}}
        for name, node in self.spec.nodes.items():
            out["nodes"][name] = {"kind": node["kind"], "address": self.address(name),
                                  "running": self.is_running(name), "pid": node.get("pid")}
        return out

    # ------------------------------------------------------------------ generation

    def generate(self) -> None:
        if self.root.exists() and any(self.root.iterdir()) and not (self.root / "network.json").exists():
            raise FabricNetworkError(f"{self.root} exists and is not a clinfed Fabric network folder; choose another")
        for sub in ("crypto", "channel", "data", "logs", "config", "chaincode"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        self.save()
        for sub in ("channel", "data", "logs", "config", "chaincode"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_crypto_config()
        self._run([self.bin("cryptogen"), "generate", f"--config={self.root / 'crypto-config.yaml'}",
                   f"--output={self.root / 'crypto'}"], "cryptogen")
        self._write_node_configs()
        self._write_configtx()
        self._run([self.bin("configtxgen"), "-profile", "ClinfedChannel", "-outputBlock", str(self.block_path),
                   "-channelID", self.spec.channel], "configtxgen", env={"FABRIC_CFG_PATH": str(self.root)})

    def _write_crypto_config(self) -> None:
        orderer_specs = [{"Hostname": n.split(".")[0], "SANS": SANS} for n in self.orderers]
        peer_orgs = []
        for org in self.app_orgs:
            has_peer = any(self.spec.nodes[p]["org"] == org for p in self.peers)
            peer_orgs.append({"Name": org, "Domain": f"{org.lower()}.clinfed", "EnableNodeOUs": True,
                              "Template": {"Count": 1 if has_peer else 0, "SANS": SANS}, "Users": {"Count": 1}})
        # The chaincode service's TLS identities: a server certificate for it, a client one for peers.
        peer_orgs.append({"Name": "Chaincode", "Domain": "chaincode.clinfed", "EnableNodeOUs": True,
                          "Specs": [{"Hostname": "server", "SANS": SANS}], "Users": {"Count": 1}})
        config = {"OrdererOrgs": [{"Name": "Orderer", "Domain": "orderer.clinfed", "EnableNodeOUs": True,
                                   "Specs": orderer_specs}], "PeerOrgs": peer_orgs}
        (self.root / "crypto-config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def _write_node_configs(self) -> None:
        """core.yaml and orderer.yaml from the release's sampleconfig, with what env vars cannot set:
        a blank ``vm.endpoint`` (no Docker) and the CCaaS builder at its absolute path."""
        sample = self.home / "config"
        core = yaml.safe_load((sample / "core.yaml").read_text())
        core["vm"]["endpoint"] = ""
        core["chaincode"]["externalBuilders"] = [{"name": "ccaas_builder", "path": str(self.home / "builders" / "ccaas"),
                                                  "propagateEnvironment": ["CHAINCODE_AS_A_SERVICE_BUILDER_CONFIG"]}]
        (self.root / "config" / "core.yaml").write_text(yaml.safe_dump(core, sort_keys=False))
        shutil.copy(sample / "orderer.yaml", self.root / "config" / "orderer.yaml")

    def _org_section(self, org: str) -> dict:
        msp = f"{org}MSP"
        section = {"Name": msp, "ID": msp, "MSPDir": str(self.org_dir(org) / "msp")}
        if org == "Orderer":
            section["Policies"] = {
                "Readers": {"Type": "Signature", "Rule": f"OR('{msp}.member')"},
                "Writers": {"Type": "Signature", "Rule": f"OR('{msp}.member')"},
                "Admins": {"Type": "Signature", "Rule": f"OR('{msp}.admin')"}}
            section["OrdererEndpoints"] = [self.address(n) for n in self.orderers]
            return section
        section["Policies"] = {
            "Readers": {"Type": "Signature", "Rule": f"OR('{msp}.admin', '{msp}.peer', '{msp}.client')"},
            "Writers": {"Type": "Signature", "Rule": f"OR('{msp}.admin', '{msp}.client')"},
            "Admins": {"Type": "Signature", "Rule": f"OR('{msp}.admin')"}}
        peers = [p for p in self.peers if self.spec.nodes[p]["org"] == org]
        if peers:
            # Only an org that runs a peer has an Endorsement policy, so the channel's
            # "MAJORITY Endorsement" counts peer orgs only: observers can neither endorse nor block.
            section["Policies"]["Endorsement"] = {"Type": "Signature", "Rule": f"OR('{msp}.peer')"}
            # anchor peers: how other orgs' gateways and discovery find this org's peer
            section["AnchorPeers"] = [{"Host": HOST, "Port": self.spec.nodes[p]["ports"]["listen"]} for p in peers]
        return section

    def _write_configtx(self) -> None:
        implicit = lambda rule: {"Type": "ImplicitMeta", "Rule": rule}  # noqa: E731
        orderer = {
            "OrdererType": "BFT" if self.spec.consensus == "bft" else "etcdraft",
            "BatchTimeout": self.spec.batch_timeout,
            "BatchSize": {"MaxMessageCount": self.spec.max_message_count, "AbsoluteMaxBytes": "10 MB",
                          "PreferredMaxBytes": "2 MB"},
            "Organizations": [self._org_section("Orderer")],
            "Policies": {"Readers": implicit("ANY Readers"), "Writers": implicit("ANY Writers"),
                         "Admins": implicit("MAJORITY Admins"), "BlockValidation": implicit("ANY Writers")},
            "Capabilities": {"V2_0": True},
        }
        if self.spec.consensus == "bft":
            orderer["SmartBFT"] = {
                "RequestBatchMaxCount": self.spec.max_message_count, "RequestBatchMaxInterval": self.spec.batch_timeout,
                "RequestForwardTimeout": "2s", "RequestComplainTimeout": "20s", "RequestAutoRemoveTimeout": "3m0s",
                "ViewChangeResendInterval": "5s", "ViewChangeTimeout": "20s", "LeaderHeartbeatTimeout": "10s",
                "CollectTimeout": "1s", "RequestBatchMaxBytes": 10485760, "IncomingMessageBufferSize": 200,
                "RequestPoolSize": 100000, "LeaderHeartbeatCount": 10}
            orderer["ConsenterMapping"] = [
                {"ID": i + 1, "Host": HOST, "Port": self.spec.nodes[n]["ports"]["listen"], "MSPID": "OrdererMSP",
                 "Identity": str(self.node_dir(n) / "msp" / "signcerts" / f"{n}-cert.pem"),
                 "ClientTLSCert": str(self.node_dir(n) / "tls" / "server.crt"),
                 "ServerTLSCert": str(self.node_dir(n) / "tls" / "server.crt")} for i, n in enumerate(self.orderers)]
        else:
            orderer["EtcdRaft"] = {
                "Consenters": [{"Host": HOST, "Port": self.spec.nodes[n]["ports"]["listen"],
                                "ClientTLSCert": str(self.node_dir(n) / "tls" / "server.crt"),
                                "ServerTLSCert": str(self.node_dir(n) / "tls" / "server.crt")} for n in self.orderers],
                "Options": {"TickInterval": "100ms", "ElectionTick": 10, "HeartbeatTick": 1, "MaxInflightBlocks": 5,
                            "SnapshotIntervalSize": "16 MB"}}
        v3 = self.spec.version.startswith("v3")
        profile = {
            "Policies": {"Readers": implicit("ANY Readers"), "Writers": implicit("ANY Writers"),
                         "Admins": implicit("MAJORITY Admins")},
            "Capabilities": {"V3_0": True} if v3 else {"V2_0": True},
            "Orderer": orderer,
            "Application": {
                "Organizations": [self._org_section(org) for org in self.app_orgs],
                "Policies": {"Readers": implicit("ANY Readers"), "Writers": implicit("ANY Writers"),
                             "Admins": implicit("MAJORITY Admins"),
                             "LifecycleEndorsement": implicit("MAJORITY Endorsement"),
                             "Endorsement": implicit("MAJORITY Endorsement")},
                "Capabilities": {"V2_5": True}},
        }
        (self.root / "configtx.yaml").write_text(yaml.safe_dump({"Profiles": {"ClinfedChannel": profile}},
                                                                sort_keys=False))

    # ------------------------------------------------------------------ processes

    def _node_env(self, name: str) -> dict:
        node = self.spec.nodes[name]
        d, ports, data = self.node_dir(name), node["ports"], self.root / "data" / name
        tls = d / "tls"
        env = {"FABRIC_CFG_PATH": str(self.root / "config"), "FABRIC_LOGGING_SPEC": "INFO"}
        if node["kind"] == "orderer":
            env.update({
                "ORDERER_GENERAL_LISTENADDRESS": HOST, "ORDERER_GENERAL_LISTENPORT": str(ports["listen"]),
                "ORDERER_GENERAL_LOCALMSPID": "OrdererMSP", "ORDERER_GENERAL_LOCALMSPDIR": str(d / "msp"),
                "ORDERER_GENERAL_TLS_ENABLED": "true", "ORDERER_GENERAL_TLS_PRIVATEKEY": str(tls / "server.key"),
                "ORDERER_GENERAL_TLS_CERTIFICATE": str(tls / "server.crt"),
                "ORDERER_GENERAL_TLS_ROOTCAS": f"[{tls / 'ca.crt'}]",
                "ORDERER_GENERAL_CLUSTER_CLIENTCERTIFICATE": str(tls / "server.crt"),
                "ORDERER_GENERAL_CLUSTER_CLIENTPRIVATEKEY": str(tls / "server.key"),
                "ORDERER_GENERAL_CLUSTER_ROOTCAS": f"[{tls / 'ca.crt'}]",
                "ORDERER_GENERAL_BOOTSTRAPMETHOD": "none", "ORDERER_CHANNELPARTICIPATION_ENABLED": "true",
                "ORDERER_FILELEDGER_LOCATION": str(data / "ledger"),
                "ORDERER_CONSENSUS_WALDIR": str(data / "wal"), "ORDERER_CONSENSUS_SNAPDIR": str(data / "snap"),
                "ORDERER_OPERATIONS_LISTENADDRESS": f"{HOST}:{ports['operations']}",
                "ORDERER_METRICS_PROVIDER": "disabled",
                "ORDERER_ADMIN_LISTENADDRESS": f"{HOST}:{ports['admin']}",
                "ORDERER_ADMIN_TLS_ENABLED": "true", "ORDERER_ADMIN_TLS_CERTIFICATE": str(tls / "server.crt"),
                "ORDERER_ADMIN_TLS_PRIVATEKEY": str(tls / "server.key"),
                "ORDERER_ADMIN_TLS_ROOTCAS": f"[{tls / 'ca.crt'}]",
                "ORDERER_ADMIN_TLS_CLIENTAUTHREQUIRED": "true",
                "ORDERER_ADMIN_TLS_CLIENTROOTCAS": f"[{tls / 'ca.crt'}]",
            })
        elif node["kind"] == "peer":
            listen = f"{HOST}:{ports['listen']}"
            env.update({
                "CORE_PEER_ID": name, "CORE_PEER_ADDRESS": listen, "CORE_PEER_LISTENADDRESS": listen,
                "CORE_PEER_CHAINCODEADDRESS": f"{HOST}:{ports['chaincode']}",
                "CORE_PEER_CHAINCODELISTENADDRESS": f"{HOST}:{ports['chaincode']}",
                "CORE_PEER_GOSSIP_BOOTSTRAP": listen, "CORE_PEER_GOSSIP_EXTERNALENDPOINT": listen,
                "CORE_PEER_GOSSIP_USELEADERELECTION": "false", "CORE_PEER_GOSSIP_ORGLEADER": "true",
                # Fast membership: a peer that missed its first handshake is retried within a
                # second, not 25 s, and a stopped peer is dropped from discovery after 5 s.
                "CORE_PEER_GOSSIP_ALIVETIMEINTERVAL": "1s", "CORE_PEER_GOSSIP_ALIVEEXPIRATIONTIMEOUT": "5s",
                "CORE_PEER_GOSSIP_RECONNECTINTERVAL": "1s",
                "CORE_PEER_LOCALMSPID": f"{node['org']}MSP", "CORE_PEER_MSPCONFIGPATH": str(d / "msp"),
                "CORE_PEER_TLS_ENABLED": "true", "CORE_PEER_TLS_CERT_FILE": str(tls / "server.crt"),
                "CORE_PEER_TLS_KEY_FILE": str(tls / "server.key"), "CORE_PEER_TLS_ROOTCERT_FILE": str(tls / "ca.crt"),
                "CORE_PEER_FILESYSTEMPATH": str(data), "CORE_LEDGER_SNAPSHOTS_ROOTDIR": str(data / "snapshots"),
                "CORE_LEDGER_STATE_STATEDATABASE": "goleveldb",
                "CORE_OPERATIONS_LISTENADDRESS": f"{HOST}:{ports['operations']}",
                "CORE_METRICS_PROVIDER": "disabled", "CORE_PEER_GATEWAY_ENABLED": "true",
                "CORE_PEER_AUTHENTICATION_TIMEWINDOW": self.spec.auth_timewindow,
            })
        else:  # the chaincode service
            ca = self.tls_ca("Chaincode")
            env = {"CHAINCODE_ID": self.spec.package_id, "CHAINCODE_SERVER_ADDRESS": self.address(name),
                   "CHAINCODE_TLS_KEY": str(tls / "server.key"), "CHAINCODE_TLS_CERT": str(tls / "server.crt"),
                   "CHAINCODE_CLIENT_CA_CERT": str(ca),
                   "PYTHONPATH": os.pathsep.join([str(REPO / "chaincode"), str(REPO / "custom"),
                                                  os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        return env

    def _command(self, name: str) -> list[str]:
        kind = self.spec.nodes[name]["kind"]
        if kind == "orderer":
            return [self.bin("orderer")]
        if kind == "peer":
            return [self.bin("peer"), "node", "start"]
        return [sys.executable, "-m", "clinfed_chaincode.server"]

    def start_node(self, name: str, *, wait: float = 60.0) -> None:
        if self.is_running(name):
            return
        self._launch_only(name)
        self._wait_started(name, wait)

    def _wait_ready(self, name: str, process: subprocess.Popen, log_path: Path, wait: float) -> None:
        node = self.spec.nodes[name]
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise FabricNetworkError(f"{name} exited with {process.returncode} while starting; "
                                         f"last log lines ({log_path}):\n{_tail(log_path)}")
            try:
                if node["kind"] == "chaincode":
                    with socket.create_connection((HOST, node["ports"]["listen"]), timeout=1):
                        return
                else:
                    url = f"http://{HOST}:{node['ports']['operations']}/healthz"
                    with urllib.request.urlopen(url, timeout=1) as reply:
                        if reply.status == 200:
                            return
            except OSError:
                pass
            time.sleep(0.1)
        raise FabricNetworkError(f"{name} not ready after {wait:.0f} s; last log lines ({log_path}):\n{_tail(log_path)}")

    def is_running(self, name: str) -> bool:
        pid = self.spec.nodes[name].get("pid")
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        try:  # a zombie child of ours counts as stopped
            done, _ = os.waitpid(pid, os.WNOHANG)
            return done == 0
        except ChildProcessError:
            return _cmdline_matches(pid, self._command(name)[0])

    def stop_node(self, name: str, *, timeout: float = 15.0) -> None:
        pid = self.spec.nodes[name].get("pid")
        if pid and self.is_running(name):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while self.is_running(name) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.is_running(name):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                while self.is_running(name):
                    time.sleep(0.05)
        self.spec.nodes[name]["pid"] = None
        if (self.root / "network.json").exists():
            self.save()

    def start_all(self) -> None:
        for name in self.orderers + self.peers:
            self._launch_only(name)
        for name in self.orderers + self.peers:
            self._wait_started(name)

    def _launch_only(self, name: str) -> None:
        log_path = self.root / "logs" / f"{name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(self._command(name), env={**os.environ, **self._node_env(name)},
                                       stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=self.root, start_new_session=True)
        self.spec.nodes[name]["pid"] = process.pid
        self._processes[name] = process
        self.save()

    def _wait_started(self, name: str, wait: float = 60.0) -> None:
        self._wait_ready(name, self._processes.pop(name), self.root / "logs" / f"{name}.log", wait)

    # ------------------------------------------------------------------ channel

    def create_channel(self) -> None:
        admin = self.user_dir("Orderer", "Admin") / "tls"
        for name in self.orderers:
            self._run([self.bin("osnadmin"), "channel", "join", "--channelID", self.spec.channel,
                       "--config-block", str(self.block_path), "-o", self.address(name, "admin"),
                       "--ca-file", str(self.tls_ca("Orderer")), "--client-cert", str(admin / "client.crt"),
                       "--client-key", str(admin / "client.key")], f"osnadmin channel join on {name}")
        self._parallel([lambda p=p: self.peer_cli(p, ["channel", "join", "-b", str(self.block_path)],
                                                  f"peer channel join on {p}") for p in self.peers])

    # ------------------------------------------------------------------ chaincode

    def package(self) -> tuple[Path, str]:
        """The CCaaS package (same bytes every time for the same network) and its package ID."""
        node = self.spec.nodes["chaincode"]
        client = self.user_dir("Chaincode") / "tls"
        connection = {"address": self.address("chaincode"), "dial_timeout": "10s", "tls_required": True,
                      "client_auth_required": True, "client_key": (client / "client.key").read_text(),
                      "client_cert": (client / "client.crt").read_text(),
                      "root_cert": self.tls_ca("Chaincode").read_text()}
        assert node["kind"] == "chaincode"
        code = _tar_gz({"connection.json": json.dumps(connection, indent=2).encode()})
        metadata = json.dumps({"type": "ccaas", "label": CONTRACT_LABEL}).encode()
        package = _tar_gz({"metadata.json": metadata, "code.tar.gz": code})
        path = self.root / "chaincode" / f"{CONTRACT_LABEL}.tar.gz"
        path.write_bytes(package)
        return path, f"{CONTRACT_LABEL}:{hashlib.sha256(package).hexdigest()}"

    def deploy(self) -> None:
        """Install the package on every peer, start the chaincode service, define the chaincode
        on the channel and initialise the consortium."""
        path, package_id = self.package()
        self._parallel([lambda p=p: self.peer_cli(p, ["lifecycle", "chaincode", "install", str(path)],
                                                  f"chaincode install on {p}", timeout=120) for p in self.peers])
        self.spec.package_id = package_id
        self.save()
        self.stop_node("chaincode")
        self.start_node("chaincode", wait=30)
        self.define_chaincode(self.spec.chaincode)
        self.init_consortium(self.spec.chaincode)
        self.wait_for_membership()

    def wait_for_membership(self, timeout: float = 90.0) -> None:
        """Wait until every peer's gateway can reach a peer of every org (gossip has converged):
        until then a gateway cannot gather endorsements from orgs it has not discovered."""
        from clinfed.ledger.errors import LedgerError

        orgs = [f"{self.spec.nodes[p]['org']}MSP" for p in self.peers]
        deadline = time.monotonic() + timeout
        for peer in self.peers:
            if not self.is_running(peer):
                continue
            client = self.ledger(f"{self.spec.nodes[peer]['org']}MSP", endorsing_orgs=orgs)
            try:
                while True:
                    built = client.new_proposal("GetConsortium")
                    try:
                        client._call("Endorse", client._gateway().Endorse, client.endorse_request(built), 10.0,
                                     "GetConsortium")
                        break
                    except LedgerError as exc:
                        if time.monotonic() > deadline:
                            raise FabricNetworkError(f"gossip has not converged after {timeout:.0f} s: {exc}") from exc
                        time.sleep(0.5)
            finally:
                client.close()

    def endorsement_args(self) -> list[str]:
        if self.spec.endorsement == "majority":
            return ["--channel-config-policy", "/Channel/Application/Endorsement"]
        members = ",".join(f"'{org}MSP.peer'" for org in self.app_orgs if any(
            self.spec.nodes[p]["org"] == org for p in self.peers))
        return ["--signature-policy", f"OutOf(2,{members})"]

    def define_chaincode(self, name: str, *, sequence: int = 1, version: str = "1.0") -> None:
        """Approve ``name`` (backed by the installed package) for every org with a peer, then commit it."""
        common = ["--channelID", self.spec.channel, "--name", name, "--version", version, "--sequence", str(sequence),
                  *self.endorsement_args(), "-o", self.address(self.orderers[0]), "--tls",
                  "--cafile", str(self.tls_ca("Orderer")), "--waitForEventTimeout", "60s"]
        self._parallel([lambda p=p: self.peer_cli(p, ["lifecycle", "chaincode", "approveformyorg",
                                                      "--package-id", self.spec.package_id, *common],
                                                  f"approve {name} for {self.spec.nodes[p]['org']}", retry=True)
                        for p in self.peers])
        # Each approval was confirmed by its own org's peer only; the commit's endorsers must all have them.
        self.wait_for_height(max(self.heights().values()))
        targets = []
        for p in self.peers:
            targets += ["--peerAddresses", self.address(p), "--tlsRootCertFiles", str(self.tls_ca(self.spec.nodes[p]["org"]))]
        self.peer_cli(self.peer_of(self.coordinator_msp), ["lifecycle", "chaincode", "commit", *common, *targets],
                      f"commit {name}", retry=True)
        self.wait_for_height(max(self.heights().values()))
        self.spec.chaincodes.append(name)
        self.save()

    def define_chaincodes(self, names: list[str], *, sequence: int = 1, version: str = "1.0") -> None:
        """Define several chaincode names on the installed package at once, through the peers'
        Gateway (no CLI processes): all approvals go into one or two blocks, then all commits.
        Only for the default ``majority`` policy; other policies go through the CLI."""
        if self.spec.endorsement != "majority":
            for name in names:
                self.define_chaincode(name, sequence=sequence, version=version)
            return
        from fabric_protos.peer import collection_pb2, policy_pb2
        from fabric_protos.peer.lifecycle import lifecycle_pb2

        policy = policy_pb2.ApplicationPolicy(
            channel_config_policy_reference="/Channel/Application/Endorsement").SerializeToString()
        orgs = [self.spec.nodes[p]["org"] for p in self.peers]
        admins = {org: self._lifecycle_client(org, [f"{org}MSP"]) for org in orgs}
        committer = self._lifecycle_client(orgs[0], [f"{o}MSP" for o in orgs])
        admins["*commit"] = committer
        try:
            approvals = []
            for name in names:
                args = lifecycle_pb2.ApproveChaincodeDefinitionForMyOrgArgs(
                    sequence=sequence, name=name, version=version, validation_parameter=policy,
                    collections=collection_pb2.CollectionConfigPackage(),
                    source=lifecycle_pb2.ChaincodeSource(local_package=lifecycle_pb2.ChaincodeSource.Local(
                        package_id=self.spec.package_id))).SerializeToString()
                approvals += [lambda c=admins[o], a=args: c.submit("ApproveChaincodeDefinitionForMyOrg", a)
                              for o in orgs]
            self._parallel_bounded(approvals)
            # A commit's endorsers must all have committed every approval; each approval was
            # confirmed by its own org's peer only.
            self.wait_for_height(max(c.last_block for c in admins.values() if c.last_block is not None) + 1)
            commits = []
            for name in names:
                args = lifecycle_pb2.CommitChaincodeDefinitionArgs(
                    sequence=sequence, name=name, version=version, validation_parameter=policy,
                    collections=collection_pb2.CollectionConfigPackage()).SerializeToString()
                commits.append(lambda a=args: committer.submit("CommitChaincodeDefinition", a))
            self._parallel_bounded(commits)
            self.wait_for_height(committer.last_block + 1)
        finally:
            for client in admins.values():
                client.close()
        self.spec.chaincodes += list(names)
        self.save()

    def _lifecycle_client(self, org: str, endorsing_orgs: list[str]):
        """A Gateway client of ``_lifecycle`` signing as the org's admin (approvals need the admin)."""
        from clinfed.ledger.fabric import FabricLedger
        from clinfed.ledger.identity import load_msp_identity
        from clinfed.ledger.proposal import build_proposal

        class LifecycleClient(FabricLedger):
            last_block = None

            def new_proposal(self, function, args=()):
                return build_proposal(creator=self.identity.creator, channel=self.channel, chaincode="_lifecycle",
                                      function=function, args=args, clock=self._clock)

            def _call(self, name, method, request, timeout, function):
                response = super()._call(name, method, request, timeout, function)
                if name == "CommitStatus":
                    self.last_block = max(self.last_block or 0, response.block_number)
                return response

        peer = self.peer_of(f"{org}MSP")
        identity = load_msp_identity(self.user_dir(org, "Admin") / "msp", f"{org}MSP")
        # An approval must be endorsed by the approving org's own peer only (it writes that org's
        # implicit collection); a commit goes to every org's peer, as the CLI does.
        return LifecycleClient(self.address(peer), identity, channel=self.spec.channel, chaincode="_lifecycle",
                               tls_root_cert=str(self.tls_ca(org)), endorsing_orgs=endorsing_orgs,
                               timeouts={"endorse": 60.0, "commit": 90.0})

    def heights(self) -> dict:
        """Each running peer's ledger height on the channel (qscc GetChainInfo through its own gateway)."""
        from fabric_protos.gateway import gateway_pb2

        from clinfed.ledger.fabric import _wire_fields
        from clinfed.ledger.proposal import build_proposal

        out = {}
        for peer in self.peers:
            if not self.is_running(peer):
                continue
            msp = f"{self.spec.nodes[peer]['org']}MSP"
            client = self._height_clients.get(peer)
            if client is None:
                client = self._height_clients[peer] = self.ledger(msp, endorsing_orgs=[msp])
            built = build_proposal(creator=client.identity.creator, channel=self.spec.channel, chaincode="qscc",
                                   function="GetChainInfo", args=[self.spec.channel])
            request = gateway_pb2.EvaluateRequest(transaction_id=built.tx_id, channel_id=self.spec.channel,
                                                  proposed_transaction=client.signed_proposal(built),
                                                  target_organizations=[msp])
            reply = client._call("Evaluate", client._gateway().Evaluate, request, 5.0, "GetChainInfo")
            # common.BlockchainInfo (not in the Python protos): field 1 is the height.
            out[peer] = next((v for n, v in _wire_fields(reply.result.payload) if n == 1), 0)
        return out

    def wait_for_height(self, height: int, timeout: float = 30.0) -> None:
        """Wait until every running peer has committed blocks below ``height`` (gateways confirm a
        commit on their own peer only; the others follow within milliseconds, usually)."""
        deadline = time.monotonic() + timeout
        while True:
            heights = self.heights()
            if all(h >= height for h in heights.values()):
                return
            if time.monotonic() > deadline:
                raise FabricNetworkError(f"peers did not reach height {height} in {timeout:.0f} s: {heights}")
            time.sleep(0.02)

    @staticmethod
    def _parallel_bounded(tasks, workers: int = 16) -> list:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            return [f.result() for f in [pool.submit(t) for t in tasks]]

    def init_consortium(self, chaincode: str) -> None:
        ledger = self.ledger(self.coordinator_msp, chaincode=chaincode, synced=True)
        deadline = time.monotonic() + 30
        try:
            while True:  # the peers learn of a new definition from the block that commits it
                try:
                    ledger.init_consortium(self.sites_to_msp, self.coordinator_msp)
                    return
                except Exception as exc:  # noqa: BLE001 - retried until the definition is visible
                    if time.monotonic() > deadline or "CLINFED_" in str(exc):
                        raise FabricNetworkError(f"InitConsortium on {chaincode} failed: {exc}") from exc
                    time.sleep(0.3)
        finally:
            ledger.close()

    def ledger(self, msp_id: str, *, chaincode: str | None = None, via: str | None = None, synced: bool = False,
               **kwargs):
        """A :class:`clinfed.ledger.FabricLedger` acting as ``msp_id``'s User1, through the gateway
        of its own org's peer, or of the peer of ``via`` (an MSP ID); an org without a peer goes
        through the coordinator's."""
        from clinfed.ledger.fabric import FabricLedger

        org = msp_id[:-3] if msp_id.endswith("MSP") else msp_id
        if org not in self.app_orgs:
            raise FabricNetworkError(f"{msp_id} is not an organisation of this network ({', '.join(self.app_orgs)})")
        try:
            peer = self.peer_of(via or msp_id)
        except FabricNetworkError:
            peer = self.peer_of(self.coordinator_msp)
        cls = FabricLedger
        if synced:
            network = self

            class SyncedFabricLedger(FabricLedger):
                """Each write returns once every running peer has committed its block, so a read
                through any org's gateway sees it (Fabric confirms a commit on one peer only)."""

                _block = None

                def submit(self, function, *args):
                    try:
                        return super().submit(function, *args)
                    finally:
                        if self._block is not None:
                            block, self._block = self._block, None
                            network.wait_for_height(block + 1)

                def _call(self, name, method, request, timeout, function):
                    response = super()._call(name, method, request, timeout, function)
                    if name == "CommitStatus":
                        self._block = response.block_number
                    return response

            cls = SyncedFabricLedger
        return cls.from_msp(self.address(peer), self.user_dir(org) / "msp", msp_id,
                            channel=self.spec.channel, chaincode=chaincode or self.spec.chaincode,
                            tls_root_cert=str(self.tls_ca(self.spec.nodes[peer]["org"])), **kwargs)

    def ledger_config(self, msp_id: str) -> dict:
        """The ``ledger`` block of a site configuration (clinfed.ledger.config.open_ledger) for ``msp_id``."""
        org = msp_id[:-3]
        peer = self.peer_of(msp_id) if any(self.spec.nodes[p]["org"] == org for p in self.peers) \
            else self.peer_of(self.coordinator_msp)
        return {"backend": "fabric", "msp_id": msp_id, "endpoint": self.address(peer),
                "msp_dir": str(self.user_dir(org) / "msp"),
                "tls_root_cert": str(self.tls_ca(self.spec.nodes[peer]["org"])),
                "channel": self.spec.channel, "chaincode": self.spec.chaincode}

    # ------------------------------------------------------------------ commands

    def peer_cli(self, peer: str, args: list[str], what: str, *, timeout: float = 90, retry: bool = False) -> str:
        org = self.spec.nodes[peer]["org"]
        env = {"FABRIC_CFG_PATH": str(self.root / "config"), "CORE_PEER_TLS_ENABLED": "true",
               "CORE_PEER_TLS_ROOTCERT_FILE": str(self.tls_ca(org)), "CORE_PEER_ADDRESS": self.address(peer),
               "CORE_PEER_LOCALMSPID": f"{org}MSP", "CORE_PEER_MSPCONFIGPATH": str(self.user_dir(org, "Admin") / "msp"),
               "FABRIC_LOGGING_SPEC": "WARNING"}
        deadline = time.monotonic() + (30 if retry else 0)
        while True:
            try:
                return self._run([self.bin("peer"), *args], what, env=env, timeout=timeout)
            except FabricNetworkError as exc:
                transient = any(s in str(exc) for s in ("SERVICE_UNAVAILABLE", "no Raft leader", "connection refused",
                                                        "Unavailable", "failed to connect"))
                if not (transient and time.monotonic() < deadline):
                    raise
                time.sleep(0.5)

    def _run(self, cmd: list[str], what: str, *, env: dict | None = None, timeout: float = 120) -> str:
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
    def _parallel(tasks) -> list:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(tasks))) as pool:
            futures = [pool.submit(t) for t in tasks]
            return [f.result() for f in futures]


def _tar_gz(files: dict) -> bytes:
    """A deterministic .tar.gz (fixed mtimes and owners), so the package ID is stable."""
    import gzip

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _cmdline_matches(pid: int, program: str) -> bool:
    """Whether ``pid`` still runs ``program`` (so a recycled PID is not taken for our node)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(part.decode(errors="replace")).name == Path(program).name for part in cmdline[:2])
