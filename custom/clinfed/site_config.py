"""Where a site keeps what never leaves it: its data folder and its secrets.

A deployed site writes ``local/clinfed_site.json`` in its FLARE workspace::

    {"data_dir": "/data/clinfed",            # DICOM + SEG + FHIR export (see clinfed.data)
     "secret_file": "/secrets/site_secret.key",   # pseudonymisation key (default: in data_dir)
     "masking_key_file": "masking_key.pem",   # X25519 key for secure masking (relative: to local/)
     "privacy_dir": "/var/lib/clinfed/privacy",   # DP budgets, masked rounds (default: workspace)
     "ledger": {...}}                          # see clinfed.ledger.settings

A simulator run (no such file) takes ``$CLINFED_DATA_ROOT/<site name>`` as the site's folder,
with its secrets and its privacy state inside it (the simulator wipes its own workspace on
every run; a site's spent budget must outlive that). Jobs never name any of these: the same job runs at every site.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from clinfed.config_files import read_json_object
from clinfed.errors import ConfigError

SITE_CONFIG_FILE = "clinfed_site.json"
DATA_ROOT_ENV = "CLINFED_DATA_ROOT"
MASKING_KEY_FILE = "masking_key.pem"
PRIVACY_DIR_NAME = "clinfed_privacy"
# The fields of clinfed_site.json: paths, the ledger section (read by clinfed.ledger.settings) and
# the site's privacy policy (read by clinfed.privacy.policy).
PATH_FIELDS = ("data_dir", "secret_file", "masking_key_file", "privacy_dir")
SITE_CONFIG_FIELDS = (*PATH_FIELDS, "ledger", "privacy")


@dataclass(frozen=True)
class SiteFiles:
    data_dir: Path
    secret_file: Path | None  # None: the pseudonymiser's default inside data_dir
    masking_key_file: Path
    privacy_dir: Path  # privacy state that outlives jobs: spent budgets, masked rounds


def read_site_config(config_file: Path) -> dict:
    """A participant's ``clinfed_site.json``, its fields checked: known names, paths as strings."""
    config = read_json_object(config_file)
    for name, value in config.items():
        if name not in SITE_CONFIG_FIELDS:
            raise ConfigError(f"{config_file}: field {name!r} is unknown (known: {', '.join(SITE_CONFIG_FIELDS)})")
        if name in PATH_FIELDS and not (isinstance(value, str) and value.strip()):
            raise ConfigError(f"{config_file}: field {name!r} must be a path string, got {value!r}")
    return config


def site_files(site: str, site_config_dir: str | os.PathLike) -> SiteFiles:
    """The site's files, from ``<site_config_dir>/clinfed_site.json`` or ``$CLINFED_DATA_ROOT``."""
    local = Path(site_config_dir)
    config_file = local / SITE_CONFIG_FILE
    if config_file.is_file():
        config = read_site_config(config_file)
        if "data_dir" not in config:
            raise ConfigError(f"{config_file}: field 'data_dir' is missing")
        secret = config.get("secret_file")
        return SiteFiles(Path(config["data_dir"]), Path(secret) if secret else None,
                         local / config.get("masking_key_file", MASKING_KEY_FILE),
                         local / config.get("privacy_dir", Path("..") / PRIVACY_DIR_NAME))
    if os.environ.get(DATA_ROOT_ENV):
        data_dir = Path(os.environ[DATA_ROOT_ENV]) / site
        return SiteFiles(data_dir, None, data_dir / MASKING_KEY_FILE, data_dir / PRIVACY_DIR_NAME)
    raise ConfigError(f"site {site}: no {config_file} and ${DATA_ROOT_ENV} is not set; "
                      f"tell clinfed where this site's data lives")
