"""``clinfed consortium provision``: FLARE startup kits and every participant's ``local/`` policy
from the one consortium definition.

Output folder layout::

    DIR/consortium.yml        the definition provisioned (a copy)
    DIR/project.yml           the FLARE project file generated from it (api_version 3)
    DIR/workspace/            what `nvflare provision` wrote (state/ holds the root CA)
    DIR/kits/<participant>/   the startup kits (a link to workspace/<name>/prod_NN/<participant>)
    DIR/server-storage/       the server's job store and snapshots (not /tmp/nvflare)
    DIR/ledger/ledger.sqlite  the consortium's LocalLedger (backend local)
    DIR/fabric/fabric_orgs.json, DIR/fabric/flare_to_fabric.json
    DIR/provisioning.json     what was made where, read by `consortium up|down|status`

Provisioning holds no site secret: each site creates its own masking key and registers its public
half on the ledger itself (``clinfed keys register``), and makes its own pseudonymisation key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from clinfed.config_files import read_json_object
from clinfed.errors import ConfigError
from clinfed.ledger.settings import COORDINATOR, COORDINATOR_MSP
from clinfed.site_config import SITE_CONFIG_FILE

from . import local_files
from .definition import Consortium, load_consortium

STATE_FILE = "provisioning.json"
LEDGER_FILE = "ledger.sqlite"
BUILDERS = [
    {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
     "args": {"template_file": ["master_template.yml", "aws_template.yml", "azure_template.yml"]}},
    {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
    {"path": "nvflare.lighter.impl.cert.CertBuilder"},
    {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
]


class ProvisionError(ConfigError):
    """Provisioning could not be completed (the message says which step and why)."""


def project_yml(consortium: Consortium) -> dict:
    """The FLARE project file (api_version 3) for the consortium."""
    c = consortium.coordinator
    server = {"name": c.name, "type": "server", "org": c.org, "fed_learn_port": c.fed_learn_port,
              "default_host": c.host}
    if c.admin_port != c.fed_learn_port:
        server["admin_port"] = c.admin_port
    participants = [server]
    participants += [{"name": s.name, "type": "client", "org": s.org} for s in consortium.sites]
    participants += [{"name": a.name, "type": "admin", "org": a.org, "role": a.role} for a in consortium.admins]
    return {"api_version": 3, "name": consortium.name,
            "description": f"clinfed consortium {consortium.name}, study {consortium.study}",
            "participants": participants, "builders": BUILDERS}


def nvflare_command() -> list[str]:
    """The ``nvflare`` of this environment (the venv's, beside our interpreter)."""
    beside = Path(sys.executable).parent / "nvflare"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("nvflare")
    if found:
        return [found]
    return [sys.executable, "-m", "nvflare.cli"]


def tool_env() -> dict:
    """Environment for FLARE tools and start scripts: this interpreter's bin first on PATH (the
    kits' scripts run a bare ``python3``), and one thread per process (2-core machines)."""
    env = dict(os.environ)
    # A deployed participant takes its data, ledger and job IDs from its own local/ files only.
    for name in ("CLINFED_JOB_ID", "CLINFED_LEDGER", "CLINFED_DATA_ROOT"):
        env.pop(name, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


@dataclass
class ProvisionResult:
    out: Path
    consortium: Consortium
    kits: dict[str, Path]
    seconds: float
    ledger_file: Path | None
    state: dict = field(default_factory=dict)

    def kit(self, name: str) -> Path:
        return self.kits[name]

    def to_dict(self) -> dict:
        return {"out": str(self.out), "kits": {k: str(v) for k, v in self.kits.items()},
                "seconds": round(self.seconds, 2), "ledger": str(self.ledger_file) if self.ledger_file else None}


def provision(consortium_file: str | Path, out: str | Path, *, data_root: str | Path | None = None,
              port: int | None = None, log=lambda message: None) -> ProvisionResult:
    """Validate the definition, run ``nvflare provision`` and write every participant's ``local/``.

    Args:
        consortium_file: the consortium definition.
        out: the output folder: new, or an empty folder. If provisioning fails (or is interrupted)
            everything it wrote is removed again, so a half-made consortium is never left behind.
        data_root: for a trial on one machine: each site's ``data_dir`` is ``<data_root>/<site>``
            unless the definition gives one.
        port: override the server's port (fed_learn and admin).
    """
    started = time.perf_counter()
    consortium = load_consortium(consortium_file)
    if port is not None:
        consortium = consortium.with_port(int(port))
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ProvisionError(f"{out}: --out is a file; give a new or empty folder")
    existed = out.is_dir()
    if existed and any(out.iterdir()):
        held = "an earlier provisioning" if (out / STATE_FILE).exists() else \
            f"{sum(1 for _ in out.iterdir())} entries"
        raise ProvisionError(f"{out}: --out must be a new or empty folder; it holds {held}. "
                             f"Choose another --out or empty it")
    created = out  # the topmost folder this run creates
    while not created.parent.exists():
        created = created.parent
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _provision(consortium_file, consortium, out, data_root, log, started)
    except BaseException:
        # Remove what this run wrote; a folder the caller made stays, empty.
        for entry in list(out.iterdir()) if existed else [created]:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        raise


def _provision(consortium_file: Path, consortium: Consortium, out: Path, data_root, log,
               started: float) -> ProvisionResult:
    shutil.copyfile(consortium_file, out / "consortium.yml")
    (out / "project.yml").write_text(yaml.safe_dump(project_yml(consortium), sort_keys=False))

    workspace = out / "workspace"
    log(f"running nvflare provision for {len(consortium.sites)} sites and {len(consortium.admins)} admins")
    proc = subprocess.run([*nvflare_command(), "provision", "-p", str(out / "project.yml"), "-w", str(workspace),
                           "--force"], cwd=out, env=tool_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        said = [line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
        raise ProvisionError(f"nvflare provision failed (exit {proc.returncode}): {said[-1] if said else 'no output'}")
    prods = sorted((workspace / consortium.name).glob("prod_*"))
    if not prods:
        raise ProvisionError(f"nvflare provision wrote no prod_NN folder under {workspace / consortium.name}")
    prod = prods[-1]
    participants = [consortium.coordinator.name, *consortium.site_names, *(a.name for a in consortium.admins)]
    kits_dir = out / "kits"
    kits_dir.mkdir(exist_ok=True)
    kits = {}
    for name in participants:
        if not (prod / name / "startup").is_dir():
            raise ProvisionError(f"{prod / name}: no startup kit was made for participant {name!r}")
        link = kits_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(prod / name, target_is_directory=True)
        kits[name] = link

    ledger_file = None
    if consortium.ledger.get("backend", "local") == "local":
        ledger_file = out / "ledger" / LEDGER_FILE
        ledger_file.parent.mkdir(parents=True, exist_ok=True)

    auth = local_files.authorization(consortium)
    server_kit = kits[consortium.coordinator.name]
    for name in [consortium.coordinator.name, *consortium.site_names]:
        local = kits[name] / "local"
        local_files.write_json(local / "authorization.json", auth)
        default = json.loads((local / "resources.json.default").read_text())
        resources = local_files.allow_list(default)
        if name == consortium.coordinator.name:
            resources = local_files.move_server_storage(resources, out / "server-storage")
        local_files.write_json(local / "resources.json", resources)
    local_files.write_json(server_kit / "local" / SITE_CONFIG_FILE,
                           local_files.site_config(consortium, COORDINATOR, ledger_file))
    for site in consortium.sites:
        local = kits[site.name] / "local"
        local_files.write_json(local / "privacy.json", local_files.privacy(site, consortium.study))
        data_dir = site.data_dir or (str(Path(data_root).resolve() / site.name) if data_root else None)
        local_files.write_json(local / SITE_CONFIG_FILE, local_files.site_config(consortium, site.name, ledger_file,
                                                                                  data_dir))

    local_files.write_json(out / "fabric" / "fabric_orgs.json", local_files.fabric_orgs(consortium))
    local_files.write_json(out / "fabric" / "flare_to_fabric.json", local_files.flare_to_fabric(consortium))

    if ledger_file is not None:
        init_local_ledger(ledger_file, consortium, kits)

    state = {"consortium": consortium.name, "study": consortium.study, "source": str(Path(consortium_file).resolve()),
             "server": consortium.coordinator.name, "host": consortium.coordinator.host,
             "port": consortium.coordinator.fed_learn_port, "sites": consortium.site_names,
             "admins": {a.name: a.role for a in consortium.admins},
             "leads": [a.name for a in consortium.leads], "prod_dir": str(prod),
             "kits": {k: str(v) for k, v in kits.items()},
             "ledger": str(ledger_file) if ledger_file else None,
             "server_storage": str(out / "server-storage"),
             # FLARE reads it only from the server's environment or command line (read before
             # resources.json is merged in): `up` exports it for the server process.
             "server_env": server_env(consortium)}
    local_files.write_json(out / STATE_FILE, state)
    seconds = time.perf_counter() - started
    log(f"provisioned {consortium.name} into {out} in {seconds:.1f} s")
    return ProvisionResult(out, consortium, kits, seconds, ledger_file, state)


def server_env(consortium: Consortium) -> dict[str, str]:
    """Environment variables the server process needs for the definition's server settings."""
    env = {}
    if consortium.coordinator.client_outcome_wait_timeout is not None:
        env["NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT"] = str(consortium.coordinator.client_outcome_wait_timeout)
    return env


def kit_identity_files(kit: Path, participant: str):
    """A participant's ledger identity in its startup kit (see :func:`local_files.kit_identity`)."""
    from clinfed.ledger.pki import IdentityFiles
    from clinfed.ledger.settings import DEFAULT_HEAD_FILE

    local = Path(kit) / "local"
    return IdentityFiles(*(local / path for path in local_files.kit_identity(participant).values()),
                         head_file=local / DEFAULT_HEAD_FILE)


def kit_ledger(ledger_file: Path, kit: Path, participant: str, msp_id: str):
    """The LocalLedger as ``participant``, signing with its startup kit's own key."""
    from clinfed.ledger import LocalLedger

    files = kit_identity_files(kit, participant)
    return LocalLedger(ledger_file, identity=files.load(msp_id), trusted_ca=files.ca_pem(), head_file=files.head_file)


def init_local_ledger(ledger_file: Path, consortium: Consortium, kits: dict[str, Path]) -> None:
    """Create the consortium's LocalLedger: its genesis block trusts FLARE's root CA and binds each
    MSP ID to its participant's kit certificate (the server's for the coordinator); the server's
    key signs it and initialises the consortium. Sites register their own masking keys
    (``clinfed keys register``, signed with the site's kit key)."""
    from cryptography import x509

    from clinfed.ledger import LocalLedger
    from clinfed.ledger.pki import Membership, common_name

    server_kit = kits[consortium.coordinator.name]
    members = {COORDINATOR_MSP: (COORDINATOR, server_kit)}
    members.update({s.msp_id: (s.name, kits[s.name]) for s in consortium.sites})
    names = {msp: (common_name(x509.load_pem_x509_certificate(kit_identity_files(kit, p).cert.read_bytes())),)
             for msp, (p, kit) in members.items()}
    server = kit_identity_files(server_kit, COORDINATOR)
    membership = Membership((server.ca_pem(),), names)
    LocalLedger.create(ledger_file, server.load(COORDINATOR_MSP), membership).close()
    with kit_ledger(ledger_file, server_kit, COORDINATOR, COORDINATOR_MSP) as ledger:
        ledger.init_consortium({s.name: s.msp_id for s in consortium.sites}, COORDINATOR_MSP)


def load_state(out: str | Path) -> dict:
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"{Path(out)}: no {STATE_FILE}; provision it first (clinfed consortium provision "
                          f"CONSORTIUM_YML --out {out})")
    return read_json_object(path)


__all__ = ["provision", "project_yml", "ProvisionResult", "ProvisionError", "load_state", "COORDINATOR"]
