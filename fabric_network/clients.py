"""Ledger clients of a network: a :class:`clinfed.ledger.FabricLedger` for an organisation's user,
the ``ledger`` block of a site configuration, and each peer's chain height."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .errors import FabricNetworkError

if TYPE_CHECKING:
    from .network import Network


class LedgerClients:
    def __init__(self, net: "Network"):
        self.net = net
        self._height_clients: dict = {}

    def _gateway_peer(self, msp_id: str, via: str | None = None) -> str:
        """The peer whose gateway ``msp_id`` uses: its own org's, or ``via``'s; an org without a
        peer (an observer) goes through the coordinator's."""
        net = self.net
        org = msp_id[:-3] if msp_id.endswith("MSP") else msp_id
        if org not in net.app_orgs:
            raise FabricNetworkError(f"{msp_id} is not an organisation of this network ({', '.join(net.app_orgs)})")
        try:
            return net.peer_of(via or msp_id)
        except FabricNetworkError:
            return net.peer_of(net.coordinator_msp)

    def ledger(self, msp_id: str, *, chaincode: str | None = None, via: str | None = None, synced: bool = False,
               **kwargs):
        """A :class:`clinfed.ledger.FabricLedger` acting as ``msp_id``'s User1, through the gateway
        of its own org's peer, or of the peer of ``via`` (an MSP ID). With ``synced``, each write
        returns once every running peer has committed it (Fabric confirms a commit on the
        gateway's own peer only), so a read through any org's gateway sees it."""
        from clinfed.ledger.fabric import FabricLedger

        net = self.net
        peer = self._gateway_peer(msp_id, via)
        cls = FabricLedger
        if synced:
            clients = self

            class SyncedFabricLedger(FabricLedger):
                _block = None

                def submit(self, function, *args):
                    try:
                        return super().submit(function, *args)
                    finally:
                        if self._block is not None:
                            block, self._block = self._block, None
                            clients.wait_for_height(block + 1)

                def _call(self, name, method, request, timeout, function):
                    response = super()._call(name, method, request, timeout, function)
                    if name == "CommitStatus":
                        self._block = response.block_number
                    return response

            cls = SyncedFabricLedger
        return cls.from_msp(net.address(peer), net.user_dir(msp_id[:-3]) / "msp", msp_id,
                            channel=net.spec.channel, chaincode=chaincode or net.spec.chaincode,
                            tls_root_cert=str(net.tls_ca(net.spec.nodes[peer]["org"])), **kwargs)

    def ledger_config(self, msp_id: str) -> dict:
        """The ``ledger`` block of a site configuration (clinfed.ledger.config.open_ledger) for ``msp_id``."""
        net = self.net
        peer = self._gateway_peer(msp_id)
        return {"backend": "fabric", "msp_id": msp_id, "endpoint": net.address(peer),
                "msp_dir": str(net.user_dir(msp_id[:-3]) / "msp"),
                "tls_root_cert": str(net.tls_ca(net.spec.nodes[peer]["org"])),
                "channel": net.spec.channel, "chaincode": net.spec.chaincode}

    def heights(self) -> dict:
        """Each running peer's ledger height on the channel (qscc GetChainInfo through its own gateway)."""
        net = self.net
        out = {}
        for peer in net.peers:
            if not net.processes.is_running(peer):
                continue
            client = self._height_clients.get(peer)
            if client is None:
                msp = f"{net.spec.nodes[peer]['org']}MSP"
                client = self._height_clients[peer] = self.ledger(msp, endorsing_orgs=[msp])
            out[peer] = client.chain_height()
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

    def close(self) -> None:
        for client in self._height_clients.values():
            client.close()
        self._height_clients.clear()
