"""The chaincode's lifecycle on the channel: each organisation's own package, its install on that
organisation's peer, the organisation's approval, the definition's commit, the consortium's
initialisation.

Every organisation runs the contract in a chaincode service of its own, and its package's
``connection.json`` names that service (its address, the org's TLS CA, and the org peer's own
TLS key pair as the client), so each org's package, and its package ID, is its own. The chaincode
definition does not name a package: each org approves it with the package its peer installed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import time
from typing import TYPE_CHECKING

from .errors import FabricNetworkError

if TYPE_CHECKING:
    from .network import Network

CONTRACT_LABEL = "clinfed_1.0"
ENDORSEMENT_POLICY_REF = "/Channel/Application/Endorsement"  # a majority of peer orgs (generate.endorsement_rule)


class ChaincodeLifecycle:
    def __init__(self, net: "Network"):
        self.net = net

    def package(self, org: str) -> tuple[bytes, str]:
        """``org``'s CCaaS package (the same bytes every time for the same network) and its package ID."""
        net = self.net
        peer_tls = net.node_dir(net.peer_of(f"{org}MSP")) / "tls"
        connection = {"address": net.address(net.chaincode_service_of(f"{org}MSP")), "dial_timeout": "10s",
                      "tls_required": True, "client_auth_required": True,
                      "client_key": (peer_tls / "server.key").read_text(),
                      "client_cert": (peer_tls / "server.crt").read_text(),
                      "root_cert": net.tls_ca(org).read_text()}
        code = _tar_gz({"connection.json": json.dumps(connection, indent=2).encode()})
        metadata = json.dumps({"type": "ccaas", "label": CONTRACT_LABEL}).encode()
        package = _tar_gz({"metadata.json": metadata, "code.tar.gz": code})
        return package, f"{CONTRACT_LABEL}:{hashlib.sha256(package).hexdigest()}"

    def deploy(self) -> None:
        """Each org installs its own package on its peer and starts its own chaincode service; then
        the chaincode is defined on the channel and the consortium initialised."""
        net = self.net
        paths = {}
        for org in net.peer_orgs:
            package, package_id = self.package(org)
            paths[org] = net.root / "chaincode" / f"{org.lower()}-{CONTRACT_LABEL}.tar.gz"
            paths[org].write_bytes(package)
            net.spec.package_ids[org] = package_id
        net.save()
        net.parallel([lambda p=p: net.peer_cli(p, ["lifecycle", "chaincode", "install",
                                                   str(paths[net.spec.nodes[p]["org"]])],
                                               f"chaincode install on {p}", timeout=120) for p in net.peers])
        for service in net.chaincode_services:
            net.processes.stop(service)
        net.processes.start_all(net.chaincode_services, wait=30)
        self.define_with_cli(net.spec.chaincode)
        self.init_consortium(net.spec.chaincode)
        self.wait_for_membership()

    def _approve_args(self, name: str, sequence: int, version: str) -> list[str]:
        net = self.net
        return ["--channelID", net.spec.channel, "--name", name, "--version", version, "--sequence", str(sequence),
                "--channel-config-policy", ENDORSEMENT_POLICY_REF, "-o", net.address(net.orderers[0]), "--tls",
                "--cafile", str(net.tls_ca("Orderer")), "--waitForEventTimeout", "60s"]

    def define_with_cli(self, name: str, *, sequence: int = 1, version: str = "1.0") -> None:
        """Approve ``name`` for every peer org (each with its own package), then commit it, with
        the peer CLI and explicit peer addresses (no discovery: gossip may not have converged yet)."""
        net = self.net
        common = self._approve_args(name, sequence, version)
        net.parallel([lambda p=p: net.peer_cli(
            p, ["lifecycle", "chaincode", "approveformyorg", "--package-id",
                net.spec.package_ids[net.spec.nodes[p]["org"]], *common],
            f"approve {name} for {net.spec.nodes[p]['org']}", retry=True) for p in net.peers])
        # Each approval was confirmed by its own org's peer only; the commit's endorsers must all have them.
        net.clients.wait_for_height(max(net.clients.heights().values()))
        targets = []
        for p in net.peers:
            targets += ["--peerAddresses", net.address(p), "--tlsRootCertFiles",
                        str(net.tls_ca(net.spec.nodes[p]["org"]))]
        net.peer_cli(net.peer_of(net.coordinator_msp), ["lifecycle", "chaincode", "commit", *common, *targets],
                     f"commit {name}", retry=True)
        net.clients.wait_for_height(max(net.clients.heights().values()))
        net.spec.chaincodes.append(name)
        net.save()

    def define(self, names: list[str], *, sequence: int = 1, version: str = "1.0") -> None:
        """Define several chaincode names at once through the peers' Gateway (no CLI processes):
        all approvals go into one or two blocks, then all commits. Needs converged gossip (after
        :meth:`deploy`)."""
        from fabric_protos.peer import collection_pb2, policy_pb2
        from fabric_protos.peer.lifecycle import lifecycle_pb2

        net = self.net
        policy = policy_pb2.ApplicationPolicy(channel_config_policy_reference=ENDORSEMENT_POLICY_REF).SerializeToString()
        orgs = net.peer_orgs
        admins = {org: self._lifecycle_client(org, [f"{org}MSP"]) for org in orgs}
        committer = self._lifecycle_client(orgs[0], [f"{o}MSP" for o in orgs])
        try:
            approvals = []
            for name in names:
                for org in orgs:
                    args = lifecycle_pb2.ApproveChaincodeDefinitionForMyOrgArgs(
                        sequence=sequence, name=name, version=version, validation_parameter=policy,
                        collections=collection_pb2.CollectionConfigPackage(),
                        source=lifecycle_pb2.ChaincodeSource(local_package=lifecycle_pb2.ChaincodeSource.Local(
                            package_id=net.spec.package_ids[org]))).SerializeToString()
                    approvals.append(lambda c=admins[org], a=args: c.submit("ApproveChaincodeDefinitionForMyOrg", a))
            net.parallel(approvals)
            # A commit's endorsers must all have committed every approval; each approval was
            # confirmed by its own org's peer only.
            net.clients.wait_for_height(max(c.last_block for c in admins.values()) + 1)
            commits = []
            for name in names:
                args = lifecycle_pb2.CommitChaincodeDefinitionArgs(
                    sequence=sequence, name=name, version=version, validation_parameter=policy,
                    collections=collection_pb2.CollectionConfigPackage()).SerializeToString()
                commits.append(lambda a=args: committer.submit("CommitChaincodeDefinition", a))
            net.parallel(commits)
            net.clients.wait_for_height(committer.last_block + 1)
        finally:
            for client in [*admins.values(), committer]:
                client.close()
        net.spec.chaincodes += list(names)
        net.save()

    def _lifecycle_client(self, org: str, endorsing_orgs: list[str]):
        """A Gateway client of ``_lifecycle`` signing as the org's admin (approvals need the admin)."""
        from clinfed.ledger.fabric import FabricLedger
        from clinfed.ledger.identity import load_msp_identity
        from clinfed.ledger.proposal import build_proposal

        class LifecycleClient(FabricLedger):
            last_block = 0

            def new_proposal(self, function, args=()):
                return build_proposal(creator=self.identity.creator, channel=self.channel, chaincode="_lifecycle",
                                      function=function, args=args, clock=self._clock)

            def _call(self, name, method, request, timeout, function):
                response = super()._call(name, method, request, timeout, function)
                if name == "CommitStatus":
                    self.last_block = max(self.last_block, response.block_number)
                return response

        net = self.net
        identity = load_msp_identity(net.user_dir(org, "Admin") / "msp", f"{org}MSP")
        # An approval must be endorsed by the approving org's own peer only (it writes that org's
        # implicit collection); a commit goes to every org's peer, as the CLI does.
        return LifecycleClient(net.address(net.peer_of(f"{org}MSP")), identity, channel=net.spec.channel,
                               chaincode="_lifecycle", tls_root_cert=str(net.tls_ca(org)),
                               endorsing_orgs=endorsing_orgs, timeouts={"endorse": 60.0, "commit": 90.0})

    def init_consortium(self, chaincode: str) -> None:
        """The coordinator's InitConsortium on ``chaincode`` (retried until the peers know the definition)."""
        net = self.net
        ledger = net.clients.ledger(net.coordinator_msp, chaincode=chaincode, synced=True)
        deadline = time.monotonic() + 30
        try:
            while True:  # the peers learn of a new definition from the block that commits it
                try:
                    ledger.init_consortium(net.sites_to_msp, net.coordinator_msp)
                    return
                except Exception as exc:  # noqa: BLE001 - retried until the definition is visible
                    if time.monotonic() > deadline or "CLINFED_" in str(exc):
                        raise FabricNetworkError(f"InitConsortium on {chaincode} failed: {exc}") from exc
                    time.sleep(0.3)
        finally:
            ledger.close()

    def wait_for_membership(self, timeout: float = 90.0) -> None:
        """Wait until every peer's gateway can reach a peer of every org (gossip has converged):
        until then a gateway cannot gather endorsements from orgs it has not discovered."""
        from clinfed.ledger.errors import LedgerError

        net = self.net
        orgs = [f"{org}MSP" for org in net.peer_orgs]
        deadline = time.monotonic() + timeout
        for peer in net.peers:
            if not net.processes.is_running(peer):
                continue
            client = net.clients.ledger(f"{net.spec.nodes[peer]['org']}MSP", endorsing_orgs=orgs)
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


def _tar_gz(files: dict) -> bytes:
    """A deterministic .tar.gz (fixed mtimes and owners), so the package ID is stable."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)
