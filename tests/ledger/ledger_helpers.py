"""Names and small helpers the ledger tests share (a module of its own: several test folders have a conftest)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from clinfed.ledger import LocalLedger
from clinfed.ledger.pki import create_simulation_identities, simulation_identity_files, simulation_membership

REPO = Path(__file__).resolve().parents[2]

COORDINATOR = "CoordinatorMSP"
SITES = {"site-1": "Site1MSP", "site-2": "Site2MSP", "site-3": "Site3MSP"}
OUTSIDER = "OutsiderMSP"


def subprocess_env() -> dict:
    """Environment for child processes that import clinfed and the chaincode from this tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "chaincode"), str(REPO / "custom"),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def pseudonym(n: int | str) -> str:
    """A pseudonym in clinfed.data.pseudonym's format ("p-" + 32 hex digits)."""
    return "p-" + hashlib.sha256(f"patient-{n}".encode()).hexdigest()[:32]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def new_local_ledger(path: Path, init: bool = True) -> Path:
    """A LocalLedger file with simulator identities for the coordinator, the sites and an outsider."""
    participants = {"coordinator": COORDINATOR, **SITES, "outsider": OUTSIDER}
    create_simulation_identities(path, participants)
    files = simulation_identity_files(path, "coordinator")
    LocalLedger.create(path, files.load(COORDINATOR), simulation_membership(path), head_file=files.head_file).close()
    if init:
        with LocalLedger(path, COORDINATOR) as ledger:
            ledger.init_consortium(SITES, COORDINATOR)
    return path
