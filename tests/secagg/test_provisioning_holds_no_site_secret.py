"""The consortium lead provisions, and holds no site's masking secret: every site makes its own."""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from clinfed.consortium.provision import provision
from clinfed.ledger import LocalLedger
from clinfed.ledger.settings import COORDINATOR_MSP

REPO = Path(__file__).resolve().parents[2]


_PEM = re.compile(rb"-----BEGIN ([A-Z ]*PRIVATE KEY)-----\n.*?\n-----END \1-----", re.DOTALL)


def _private_keys(folder: Path):
    """Every PEM private key in any file under ``folder`` (also JSON-escaped ones), parsed."""
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_size < 1_000_000:
            for match in _PEM.finditer(path.read_bytes().replace(b"\\n", b"\n")):
                yield path, serialization.load_pem_private_key(match.group(0), password=None)


def test_provisioning_writes_no_masking_key_and_registers_none(tmp_path):
    result = provision(REPO / "provisioning" / "consortium.yml", tmp_path / "out", data_root=tmp_path / "data")
    out = result.out
    assert not list(out.rglob("masking_key*")) and not list(out.rglob("site_keys.json"))
    keys = list(_private_keys(out))
    # FLARE's own TLS keys are there (its provisioning model: kits carry their TLS identity)...
    assert keys, "expected FLARE's TLS private keys in the kits"
    # ...but not one X25519 key: the masking secret of a site exists only where the site makes it.
    assert not [path for path, key in keys if isinstance(key, X25519PrivateKey)]
    with LocalLedger(result.ledger_file, COORDINATOR_MSP) as ledger:
        assert ledger.site_keys() == {}
        assert sorted(ledger.consortium().sites) == result.consortium.site_names
