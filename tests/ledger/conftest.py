"""A consortium on each ledger backend, for the one contract suite that runs against all of them.

To run the suite on another backend, add one entry to BACKENDS: a function that takes pytest's
``tmp_path`` and returns a :class:`Consortium` whose ``open(msp_id, clock=None)`` gives a
ledger client acting as that MSP (the Fabric one will start its network in a session fixture).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from ledger_helpers import COORDINATOR, REPO, SITES

try:  # installed with the bundle once pyproject lists it; the source tree otherwise
    import clinfed_chaincode  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "chaincode"))

from clinfed.ledger import LocalLedger  # noqa: E402


@dataclass
class Consortium:
    """Three sites and a coordinator on one initialised ledger."""

    open: Callable  # (msp_id, clock=None) -> Ledger
    backend: str

    @property
    def coordinator(self):
        return self.open(COORDINATOR)

    def site(self, name: str):
        return self.open(SITES[name])


def local_consortium(tmp_path: Path) -> Consortium:
    path = tmp_path / "ledger.sqlite"
    opened: dict = {}

    def open_as(msp_id: str, clock=None):
        if clock is not None:
            return LocalLedger(path, msp_id, clock=clock)
        if msp_id not in opened:
            opened[msp_id] = LocalLedger(path, msp_id)
        return opened[msp_id]

    open_as(COORDINATOR).init_consortium(SITES, COORDINATOR)
    return Consortium(open=open_as, backend="local")


def fabric_consortium(tmp_path: Path) -> Consortium:
    """A fresh chaincode namespace on the session's real Fabric network (fabric_network.testing)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from fabric_network.testing import fabric_opener

    return Consortium(open=fabric_opener(), backend="fabric")


BACKENDS = {
    "local": local_consortium,
    "fabric": fabric_consortium,
}


# The Fabric backend needs the native network: run with `make test-fabric` (marker `fabric`).
@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.fabric) if name == "fabric" else name
                        for name in sorted(BACKENDS)])
def consortium(request, tmp_path) -> Consortium:
    return BACKENDS[request.param](tmp_path)
