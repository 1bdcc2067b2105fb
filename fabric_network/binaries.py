"""The pinned Fabric binaries: built (or reused) by ``install.sh`` into a cache folder outside the repository."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .errors import FabricNetworkError

INSTALL_SCRIPT = Path(__file__).resolve().parent / "install.sh"
DEFAULT_VERSION = "v3.1.5"
COMMITS = {"v3.1.5": "86c1172bec37e6590c6b1ae6f847833df48d65fc", "v2.5.16": "f871cf92a026aba7b12e6f06d71ded3e6e659d71"}


def install(version: str = DEFAULT_VERSION, *, quiet: bool = False) -> Path:
    """Build (or reuse) the pinned Fabric binaries; returns the install folder (``bin/``, ``config/``,
    ``builders/ccaas``). Raises :class:`FabricNetworkError` with the build's own words on failure."""
    env = dict(os.environ, FABRIC_VERSION=version)
    result = subprocess.run(["bash", str(INSTALL_SCRIPT)], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=None if not quiet else subprocess.PIPE)
    if result.returncode != 0:
        detail = (result.stderr or "").strip() if quiet else "(see the output above)"
        raise FabricNetworkError(f"fabric_network/install.sh failed (exit {result.returncode}): {detail}")
    return Path(result.stdout.strip().splitlines()[-1])


def installed_home(version: str = DEFAULT_VERSION) -> Path | None:
    """The install folder if a complete install of ``version`` is cached (install.sh's layout), else None."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    home = Path(os.environ.get("CLINFED_FABRIC_HOME") or cache / "clinfed" / "fabric" / version)
    return home if (home / f".installed-{COMMITS[version]}").is_file() else None
