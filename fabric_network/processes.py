"""Process supervision: each node (orderer, peer, chaincode service) as a process of its own, in
its own session, with its log in ``logs/<node>.log`` and its PID in ``network.json``, so another
process can stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .errors import FabricNetworkError

if TYPE_CHECKING:
    from .network import Network

REPO = Path(__file__).resolve().parents[1]


class Supervisor:
    """Starts, watches and stops the processes of ``net``'s nodes."""

    def __init__(self, net: "Network"):
        self.net = net
        self._starting: dict = {}  # name -> Popen, between launch and readiness

    # ------------------------------------------------------------------ what each node runs

    def command(self, name: str) -> list[str]:
        kind = self.net.spec.nodes[name]["kind"]
        if kind == "orderer":
            return [self.net.bin("orderer")]
        if kind == "peer":
            return [self.net.bin("peer"), "node", "start"]
        return [sys.executable, "-m", "clinfed_chaincode.server"]

    def environment(self, name: str) -> dict:
        net = self.net
        node = net.spec.nodes[name]
        host, ports, data = node["host"], node["ports"], net.root / "data" / name
        tls = net.node_dir(name) / "tls"
        if node["kind"] == "chaincode":
            # The org's own service: its package ID, its TLS key pair, and only its own org's TLS
            # CA for the peer's client certificate.
            return {"CHAINCODE_ID": net.spec.package_ids.get(node["org"], ""),
                    "CHAINCODE_SERVER_ADDRESS": net.address(name),
                    "CHAINCODE_TLS_KEY": str(tls / "server.key"), "CHAINCODE_TLS_CERT": str(tls / "server.crt"),
                    "CHAINCODE_CLIENT_CA_CERT": str(net.tls_ca(node["org"])),
                    "PYTHONPATH": os.pathsep.join([str(REPO / "chaincode"), str(REPO / "custom"),
                                                   os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        env = {"FABRIC_CFG_PATH": str(net.root / "config"), "FABRIC_LOGGING_SPEC": "INFO"}
        if node["kind"] == "orderer":
            env.update({
                "ORDERER_GENERAL_LISTENADDRESS": host, "ORDERER_GENERAL_LISTENPORT": str(ports["listen"]),
                "ORDERER_GENERAL_LOCALMSPID": "OrdererMSP", "ORDERER_GENERAL_LOCALMSPDIR": str(net.node_dir(name) / "msp"),
                "ORDERER_GENERAL_TLS_ENABLED": "true", "ORDERER_GENERAL_TLS_PRIVATEKEY": str(tls / "server.key"),
                "ORDERER_GENERAL_TLS_CERTIFICATE": str(tls / "server.crt"),
                "ORDERER_GENERAL_TLS_ROOTCAS": f"[{tls / 'ca.crt'}]",
                "ORDERER_GENERAL_CLUSTER_CLIENTCERTIFICATE": str(tls / "server.crt"),
                "ORDERER_GENERAL_CLUSTER_CLIENTPRIVATEKEY": str(tls / "server.key"),
                "ORDERER_GENERAL_CLUSTER_ROOTCAS": f"[{tls / 'ca.crt'}]",
                "ORDERER_GENERAL_BOOTSTRAPMETHOD": "none", "ORDERER_CHANNELPARTICIPATION_ENABLED": "true",
                "ORDERER_FILELEDGER_LOCATION": str(data / "ledger"),
                "ORDERER_CONSENSUS_WALDIR": str(data / "wal"), "ORDERER_CONSENSUS_SNAPDIR": str(data / "snap"),
                "ORDERER_OPERATIONS_LISTENADDRESS": net.address(name, "operations"),
                "ORDERER_METRICS_PROVIDER": "disabled",
                "ORDERER_ADMIN_LISTENADDRESS": net.address(name, "admin"),
                "ORDERER_ADMIN_TLS_ENABLED": "true", "ORDERER_ADMIN_TLS_CERTIFICATE": str(tls / "server.crt"),
                "ORDERER_ADMIN_TLS_PRIVATEKEY": str(tls / "server.key"),
                "ORDERER_ADMIN_TLS_ROOTCAS": f"[{tls / 'ca.crt'}]",
                "ORDERER_ADMIN_TLS_CLIENTAUTHREQUIRED": "true",
                "ORDERER_ADMIN_TLS_CLIENTROOTCAS": f"[{tls / 'ca.crt'}]",
            })
        else:
            listen = net.address(name)
            env.update({
                "CORE_PEER_ID": name, "CORE_PEER_ADDRESS": listen, "CORE_PEER_LISTENADDRESS": listen,
                "CORE_PEER_CHAINCODEADDRESS": net.address(name, "chaincode"),
                "CORE_PEER_CHAINCODELISTENADDRESS": net.address(name, "chaincode"),
                "CORE_PEER_GOSSIP_BOOTSTRAP": listen, "CORE_PEER_GOSSIP_EXTERNALENDPOINT": listen,
                "CORE_PEER_GOSSIP_USELEADERELECTION": "false", "CORE_PEER_GOSSIP_ORGLEADER": "true",
                # Fast membership: a peer that missed its first handshake is retried within a
                # second, not 25 s, and a stopped peer is dropped from discovery after 5 s.
                "CORE_PEER_GOSSIP_ALIVETIMEINTERVAL": "1s", "CORE_PEER_GOSSIP_ALIVEEXPIRATIONTIMEOUT": "5s",
                "CORE_PEER_GOSSIP_RECONNECTINTERVAL": "1s",
                "CORE_PEER_LOCALMSPID": f"{node['org']}MSP", "CORE_PEER_MSPCONFIGPATH": str(net.node_dir(name) / "msp"),
                "CORE_PEER_TLS_ENABLED": "true", "CORE_PEER_TLS_CERT_FILE": str(tls / "server.crt"),
                "CORE_PEER_TLS_KEY_FILE": str(tls / "server.key"), "CORE_PEER_TLS_ROOTCERT_FILE": str(tls / "ca.crt"),
                "CORE_PEER_FILESYSTEMPATH": str(data), "CORE_LEDGER_SNAPSHOTS_ROOTDIR": str(data / "snapshots"),
                "CORE_LEDGER_STATE_STATEDATABASE": "goleveldb",
                "CORE_OPERATIONS_LISTENADDRESS": net.address(name, "operations"),
                "CORE_METRICS_PROVIDER": "disabled", "CORE_PEER_GATEWAY_ENABLED": "true",
                "CORE_PEER_AUTHENTICATION_TIMEWINDOW": net.spec.auth_timewindow,
            })
        return env

    # ------------------------------------------------------------------ starting and stopping

    def start(self, name: str, *, command: Sequence[str] | None = None, wait: float = 60.0) -> None:
        """Start ``name`` (unless it runs) and wait until it serves. ``command`` replaces what the
        node normally runs, with the same environment (e.g. another contract for an org's service)."""
        if self.is_running(name):
            return
        self._launch(name, command)
        self._wait_ready(name, wait)

    def start_all(self, names: Sequence[str], wait: float = 60.0) -> None:
        """Launch every node in ``names`` at once, then wait for each to serve."""
        for name in names:
            if not self.is_running(name):
                self._launch(name)
        for name in names:
            if name in self._starting:
                self._wait_ready(name, wait)

    def stop(self, name: str, *, timeout: float = 15.0) -> None:
        """SIGTERM the node's process group, SIGKILL it after ``timeout`` seconds."""
        pid = self.net.spec.nodes[name].get("pid")
        if pid and self.is_running(name):
            self._signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.is_running(name) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.is_running(name):
                self._signal(pid, signal.SIGKILL)
                while self.is_running(name):
                    time.sleep(0.05)
        self._starting.pop(name, None)
        self.net.spec.nodes[name]["pid"] = None
        if (self.net.root / "network.json").exists():
            self.net.save()

    def restart(self, name: str, *, command: Sequence[str] | None = None, wait: float = 60.0) -> None:
        self.stop(name)
        self.start(name, command=command, wait=wait)

    def is_running(self, name: str) -> bool:
        pid = self.net.spec.nodes[name].get("pid")
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        try:  # a zombie child of ours counts as stopped
            done, _ = os.waitpid(pid, os.WNOHANG)
            return done == 0
        except ChildProcessError:  # not our child: started by another process (the CLI)
            return _runs_a_node(pid, self.net.root)

    def log_path(self, name: str) -> Path:
        return self.net.root / "logs" / f"{name}.log"

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass

    def _launch(self, name: str, command: Sequence[str] | None = None) -> None:
        with open(self.log_path(name), "ab") as log_file:
            process = subprocess.Popen(list(command or self.command(name)),
                                       env={**os.environ, **self.environment(name)}, stdout=log_file,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.net.root,
                                       start_new_session=True)
        self.net.spec.nodes[name]["pid"] = process.pid
        self._starting[name] = process
        self.net.save()

    def _wait_ready(self, name: str, wait: float) -> None:
        """Until the node answers: its listening port, and a peer's or orderer's operations
        ``/healthz`` (which can answer before the node's gRPC service listens)."""
        process = self._starting.pop(name)
        node, log_path = self.net.spec.nodes[name], self.log_path(name)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise FabricNetworkError(f"{name} exited with {process.returncode} while starting; "
                                         f"last log lines ({log_path}):\n{_tail(log_path)}")
            try:
                with socket.create_connection((node["host"], node["ports"]["listen"]), timeout=1):
                    pass
                if node["kind"] == "chaincode":
                    return
                with urllib.request.urlopen(f"http://{self.net.address(name, 'operations')}/healthz",
                                            timeout=1) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise FabricNetworkError(f"{name} not ready after {wait:.0f} s; last log lines ({log_path}):\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _runs_a_node(pid: int, root: Path) -> bool:
    """Whether ``pid`` is still one of this network's nodes (so a recycled PID is not taken for
    it): its working directory is the network folder, where every node is started."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == root.resolve()
    except OSError:
        return False
