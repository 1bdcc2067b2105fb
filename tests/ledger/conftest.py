"""A consortium on each ledger backend, for the one contract suite that runs against all of them.

To run the suite on another backend, add one entry to BACKENDS: a function that takes pytest's
``tmp_path`` and returns a :class:`Consortium` whose ``open(msp_id, clock=None)`` gives a
ledger client acting as that MSP with its own key, and whose ``open_with(identity)`` gives a
client signing with an arbitrary identity (the opponent's tools). The Fabric one starts its
network in a session fixture.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from ledger_helpers import COORDINATOR, OUTSIDER, REPO, SITES, new_local_ledger

try:  # installed with the bundle once pyproject lists it; the source tree otherwise
    import clinfed_chaincode  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "chaincode"))

from clinfed.ledger import LocalLedger  # noqa: E402
from clinfed.ledger.pki import simulation_identity_files  # noqa: E402


@dataclass
class Consortium:
    """Three sites and a coordinator on one initialised ledger (plus an outsider org that is a
    member of the channel but not of the consortium)."""

    open: Callable  # (msp_id, clock=None) -> Ledger signing with that MSP's own key
    open_with: Callable  # (SigningIdentity) -> Ledger signing with that identity
    identity: Callable  # (msp_id) -> that MSP's SigningIdentity (certificate and key)
    backend: str

    @property
    def coordinator(self):
        return self.open(COORDINATOR)

    def site(self, name: str):
        return self.open(SITES[name])


def local_consortium(tmp_path: Path) -> Consortium:
    path = new_local_ledger(tmp_path / "ledger.sqlite")
    names = {msp: name for name, msp in {"coordinator": COORDINATOR, **SITES, "outsider": OUTSIDER}.items()}
    opened: dict = {}

    def open_as(msp_id: str, clock=None):
        if clock is not None:
            return LocalLedger(path, msp_id, clock=clock)
        if msp_id not in opened:
            opened[msp_id] = LocalLedger(path, msp_id)
        return opened[msp_id]

    def identity(msp_id: str):
        return simulation_identity_files(path, names[msp_id]).load(msp_id)

    return Consortium(open=open_as, open_with=lambda ident: LocalLedger(path, identity=ident), identity=identity,
                      backend="local")


def fabric_consortium(tmp_path: Path) -> Consortium:
    """A fresh chaincode namespace on the session's real Fabric network (fabric_network.testing)."""
    from fabric_network.testing import fabric_consortium_parts

    open_as, open_with, identity = fabric_consortium_parts()
    return Consortium(open=open_as, open_with=open_with, identity=identity, backend="fabric")


BACKENDS = {
    "local": local_consortium,
    "fabric": fabric_consortium,
}


# The Fabric backend needs the native network: run with `make test-fabric` (marker `fabric`).
@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.fabric) if name == "fabric" else name
                        for name in sorted(BACKENDS)])
def consortium(request, tmp_path) -> Consortium:
    return BACKENDS[request.param](tmp_path)
