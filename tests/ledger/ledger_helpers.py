"""Names and small helpers the ledger tests share (a module of its own: several test folders have a conftest)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

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
