"""Crypto material and configuration: cryptogen's input and output, core.yaml and orderer.yaml,
``configtx.yaml`` and the channel's genesis block."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import yaml

from .errors import FabricNetworkError

if TYPE_CHECKING:
    from .network import Network

LOCALHOST = "localhost"


def generate(net: "Network") -> None:
    """Write everything the nodes need under ``net.root`` (a fresh folder, or one of ours)."""
    root = net.root
    if root.exists() and any(root.iterdir()) and not (root / "network.json").exists():
        raise FabricNetworkError(f"{root} exists and is not a clinfed Fabric network folder; choose another")
    for sub in ("crypto", "channel", "data", "logs", "config", "chaincode"):
        shutil.rmtree(root / sub, ignore_errors=True)
    net.save()
    for sub in ("channel", "data", "logs", "config", "chaincode"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "crypto-config.yaml").write_text(yaml.safe_dump(crypto_config(net), sort_keys=False))
    net.run_tool([net.bin("cryptogen"), "generate", f"--config={root / 'crypto-config.yaml'}",
                  f"--output={root / 'crypto'}"], "cryptogen")
    for service in net.chaincode_services:
        # cryptogen makes every host of a peer org a peer (OU=peer) able to sign endorsements; a
        # chaincode service needs only its TLS key pair, so it keeps nothing else.
        shutil.rmtree(net.node_dir(service) / "msp")
    write_node_configs(net)
    (root / "configtx.yaml").write_text(yaml.safe_dump(configtx(net), sort_keys=False))
    net.run_tool([net.bin("configtxgen"), "-profile", "ClinfedChannel", "-outputBlock", str(net.block_path),
                  "-channelID", net.spec.channel], "configtxgen", env={"FABRIC_CFG_PATH": str(root)})


def crypto_config(net: "Network") -> dict:
    """cryptogen's input: one CA pair per org; a host per orderer, per peer and per chaincode
    service, each with its own address in its TLS certificate."""
    def host_spec(name: str) -> dict:
        return {"Hostname": name.split(".")[0], "SANS": [net.spec.nodes[name]["host"], LOCALHOST]}

    peer_orgs = []
    for org in net.app_orgs:
        hosts = [n for n in net.peers + net.chaincode_services if net.spec.nodes[n]["org"] == org]
        peer_orgs.append({"Name": org, "Domain": net.domain(org), "EnableNodeOUs": True,
                          "Specs": [host_spec(n) for n in hosts], "Users": {"Count": 1}})
    return {"OrdererOrgs": [{"Name": "Orderer", "Domain": net.domain("Orderer"), "EnableNodeOUs": True,
                             "Specs": [host_spec(n) for n in net.orderers]}],
            "PeerOrgs": peer_orgs}


def write_node_configs(net: "Network") -> None:
    """core.yaml and orderer.yaml from the release's sampleconfig, with what env vars cannot set:
    a blank ``vm.endpoint`` (no Docker) and the CCaaS builder at its absolute path."""
    sample = net.home / "config"
    core = yaml.safe_load((sample / "core.yaml").read_text())
    core["vm"]["endpoint"] = ""
    core["chaincode"]["externalBuilders"] = [{"name": "ccaas_builder", "path": str(net.home / "builders" / "ccaas"),
                                              "propagateEnvironment": ["CHAINCODE_AS_A_SERVICE_BUILDER_CONFIG"]}]
    (net.root / "config" / "core.yaml").write_text(yaml.safe_dump(core, sort_keys=False))
    shutil.copy(sample / "orderer.yaml", net.root / "config" / "orderer.yaml")


def endorsement_rule(net: "Network") -> str:
    """A majority of the organisations that run a peer: ``OutOf(n // 2 + 1, each peer org's peer)``.

    Written as a signature policy rather than ``ImplicitMeta MAJORITY Endorsement``: that one
    counts every channel org, and an org without a peer has no Endorsement policy to count
    (its place is a reject policy), which Fabric's discovery cannot convert, so no gateway could
    plan an endorsement at all."""
    members = [f"'{org}MSP.peer'" for org in net.peer_orgs]
    return f"OutOf({len(members) // 2 + 1}, {', '.join(members)})"


def _org_section(net: "Network", org: str) -> dict:
    msp = f"{org}MSP"
    section = {"Name": msp, "ID": msp, "MSPDir": str(net.org_dir(org) / "msp")}
    if org == "Orderer":
        section["Policies"] = {
            "Readers": {"Type": "Signature", "Rule": f"OR('{msp}.member')"},
            "Writers": {"Type": "Signature", "Rule": f"OR('{msp}.member')"},
            "Admins": {"Type": "Signature", "Rule": f"OR('{msp}.admin')"}}
        section["OrdererEndpoints"] = [net.address(n) for n in net.orderers]
        return section
    section["Policies"] = {
        "Readers": {"Type": "Signature", "Rule": f"OR('{msp}.admin', '{msp}.peer', '{msp}.client')"},
        "Writers": {"Type": "Signature", "Rule": f"OR('{msp}.admin', '{msp}.client')"},
        "Admins": {"Type": "Signature", "Rule": f"OR('{msp}.admin')"}}
    peers = [p for p in net.peers if net.spec.nodes[p]["org"] == org]
    if peers:
        # The org's own Endorsement policy validates its chaincode approvals.
        section["Policies"]["Endorsement"] = {"Type": "Signature", "Rule": f"OR('{msp}.peer')"}
        # anchor peers: how other orgs' gateways and discovery find this org's peer
        section["AnchorPeers"] = [{"Host": net.spec.nodes[p]["host"], "Port": net.spec.nodes[p]["ports"]["listen"]}
                                  for p in peers]
    return section


def configtx(net: "Network") -> dict:
    spec = net.spec
    implicit = lambda rule: {"Type": "ImplicitMeta", "Rule": rule}  # noqa: E731
    orderer = {
        "OrdererType": "BFT" if spec.consensus == "bft" else "etcdraft",
        "BatchTimeout": spec.batch_timeout,
        "BatchSize": {"MaxMessageCount": spec.max_message_count, "AbsoluteMaxBytes": "10 MB",
                      "PreferredMaxBytes": "2 MB"},
        "Organizations": [_org_section(net, "Orderer")],
        "Policies": {"Readers": implicit("ANY Readers"), "Writers": implicit("ANY Writers"),
                     "Admins": implicit("MAJORITY Admins"), "BlockValidation": implicit("ANY Writers")},
        "Capabilities": {"V2_0": True},
    }

    def tls(n: str) -> dict:
        return {"ClientTLSCert": str(net.node_dir(n) / "tls" / "server.crt"),
                "ServerTLSCert": str(net.node_dir(n) / "tls" / "server.crt")}

    if spec.consensus == "bft":
        orderer["SmartBFT"] = {
            "RequestBatchMaxCount": spec.max_message_count, "RequestBatchMaxInterval": spec.batch_timeout,
            "RequestForwardTimeout": "2s", "RequestComplainTimeout": "20s", "RequestAutoRemoveTimeout": "3m0s",
            "ViewChangeResendInterval": "5s", "ViewChangeTimeout": "20s", "LeaderHeartbeatTimeout": "10s",
            "CollectTimeout": "1s", "RequestBatchMaxBytes": 10485760, "IncomingMessageBufferSize": 200,
            "RequestPoolSize": 100000, "LeaderHeartbeatCount": 10}
        orderer["ConsenterMapping"] = [
            {"ID": i + 1, "Host": net.spec.nodes[n]["host"], "Port": net.spec.nodes[n]["ports"]["listen"],
             "MSPID": "OrdererMSP", "Identity": str(net.node_dir(n) / "msp" / "signcerts" / f"{n}-cert.pem"), **tls(n)}
            for i, n in enumerate(net.orderers)]
    else:
        orderer["EtcdRaft"] = {
            "Consenters": [{"Host": net.spec.nodes[n]["host"], "Port": net.spec.nodes[n]["ports"]["listen"], **tls(n)}
                           for n in net.orderers],
            "Options": {"TickInterval": "100ms", "ElectionTick": 10, "HeartbeatTick": 1, "MaxInflightBlocks": 5,
                        "SnapshotIntervalSize": "16 MB"}}
    majority = {"Type": "Signature", "Rule": endorsement_rule(net)}
    profile = {
        "Policies": {"Readers": implicit("ANY Readers"), "Writers": implicit("ANY Writers"),
                     "Admins": implicit("MAJORITY Admins")},
        "Capabilities": {"V3_0": True} if spec.version.startswith("v3") else {"V2_0": True},
        "Orderer": orderer,
        "Application": {
            "Organizations": [_org_section(net, org) for org in net.app_orgs],
            "Policies": {"Readers": implicit("ANY Readers"), "Writers": implicit("ANY Writers"),
                         "Admins": implicit("MAJORITY Admins"),
                         "LifecycleEndorsement": majority, "Endorsement": majority},
            "Capabilities": {"V2_5": True}},
    }
    return {"Profiles": {"ClinfedChannel": profile}}
