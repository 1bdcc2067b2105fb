"""Open the ledger a job or a site configuration names: one function for FLARE components and the CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from clinfed.errors import ConfigError

from .base import ContractLedger
from .outbox import POLICIES, OutboxLedger

BACKENDS = ("local", "fabric")


def open_ledger(config: Mapping[str, Any], *, base_dir: str | os.PathLike = ".") -> ContractLedger:
    """A ledger client from a configuration mapping (relative paths are resolved against ``base_dir``).

    Fields:
        backend: ``local`` (default) or ``fabric``.
        msp_id: the caller's MSP ID (required).
        path: ``local`` only: the SQLite file (required; it must exist).
        cert, key, ca: ``local`` only: the participant's certificate and private key and the
            consortium CA it trusts (PEM files; in a provisioned consortium the startup kit's
            ``client.crt``/``client.key`` or ``server.crt``/``server.key`` and ``rootCA.pem``).
            Without them, the simulator identity beside ``path`` (see :mod:`clinfed.ledger.pki`).
        head_file: ``local`` only: where the participant keeps the last ledger head it saw.
        endpoint, msp_dir: ``fabric`` only: the peer gateway ``host:port`` and the MSP folder of the
            signing user (required); tls_root_cert, tls_client_cert, tls_client_key (PEM files),
            server_name, endorsing_orgs optional.
        channel, chaincode: names on the network (default ``clinfed`` both).
        outbox: a journal file; when given, writes go through an :class:`OutboxLedger`.
        policy: ``async`` (default) or ``strict``, with ``outbox``.
        retry_interval, strict_timeout: seconds, with ``outbox``.
    """
    known = {"backend", "msp_id", "path", "cert", "key", "ca", "head_file", "endpoint", "msp_dir", "tls_root_cert",
             "tls_client_cert", "tls_client_key", "server_name", "endorsing_orgs", "channel", "chaincode", "outbox",
             "policy", "retry_interval", "strict_timeout"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"ledger config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    backend = config.get("backend", "local")
    if backend not in BACKENDS:
        raise ConfigError(f"ledger config: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    msp_id = _required(config, "msp_id")
    base = Path(base_dir)
    names = {"channel": config.get("channel", "clinfed"), "chaincode": config.get("chaincode", "clinfed")}

    if backend == "local":
        from .local import LocalLedger
        from .pki import IdentityFiles

        path = base / _required(config, "path")
        given = [k for k in ("cert", "key", "ca") if config.get(k)]
        if given and len(given) < 3:
            raise ConfigError(f"ledger config: a local ledger identity needs 'cert', 'key' and 'ca' together; "
                              f"only {', '.join(given)} given")
        if given:
            files = IdentityFiles(base / config["cert"], base / config["key"], base / config["ca"])
            ledger: ContractLedger = LocalLedger(
                path, identity=files.load(msp_id), trusted_ca=files.ca_pem(),
                head_file=base / config["head_file"] if config.get("head_file") else None, **names)
        else:
            ledger = LocalLedger(path, msp_id, **names)
    else:
        from .fabric import FabricLedger

        if not config.get("tls_root_cert"):
            raise ConfigError("ledger config: field 'tls_root_cert' is required for backend 'fabric': the "
                              "ledger is reached over TLS only (plaintext is refused)")
        tls = {k: base / config[k] for k in ("tls_root_cert", "tls_client_cert", "tls_client_key") if config.get(k)}
        ledger = FabricLedger.from_msp(_required(config, "endpoint"), base / _required(config, "msp_dir"), msp_id,
                                       server_name=config.get("server_name"),
                                       endorsing_orgs=config.get("endorsing_orgs"), **tls, **names)

    if config.get("outbox"):
        policy = config.get("policy", "async")
        if policy not in POLICIES:
            raise ConfigError(f"ledger config: policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        return OutboxLedger(ledger, base / config["outbox"], policy=policy,
                            retry_interval=float(config.get("retry_interval", 5.0)),
                            strict_timeout=float(config.get("strict_timeout", 120.0)))
    return ledger


def _required(config: Mapping[str, Any], field: str) -> str:
    value = config.get(field)
    if not value:
        raise ConfigError(f"ledger config: field {field!r} is required for backend {config.get('backend', 'local')!r}")
    return value
