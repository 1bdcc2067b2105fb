"""One ``make demo`` run as a user starts it (the quick demo, 2 rounds), shared by the demo's
console and report tests (tests/demo) and the audit web view's tests (tests/audit): made once per
test session, in the session's temporary folder, whichever test folder asks first."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ARGS = ["--quick", "--rounds", "2"]
REPOSITORY = Path(__file__).resolve().parents[1]
SITES = ["site-1", "site-2", "site-3"]
# A site's pseudonymisation key is a random secret and the validation split follows the keyed
# pseudonyms; these fixed keys give every site validation patients on the quick demo's data.
SITE_KEYS = {"site-1": "clinfed-demo-site-1-0", "site-2": "clinfed-demo-site-2-0", "site-3": "clinfed-demo-site-3-1"}


@dataclass(frozen=True)
class DemoRun:
    out: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def results(self) -> dict:
        return json.loads((self.out / "results.json").read_text())

    @property
    def ledger_path(self) -> Path:
        return self.out / "ledger.sqlite"

    def site_config(self, site: str) -> Path:
        return self.out / "sites" / site / "clinfed_site.json"

    @property
    def model_file(self) -> Path:
        return Path(self.results["federated"]["model_file"])


def clinfed_command() -> str:
    return str(Path(sys.executable).parent / "clinfed")


def clean_environment() -> dict:
    """The environment of a user's shell: no simulator or ledger variables from other tests, and
    no make variables of a ``make test`` this may run under."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("CLINFED_") and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}


def shared_demo_run(tmp_path_factory) -> DemoRun:
    root = tmp_path_factory.getbasetemp() / "shared_demo_run"
    record = root / "run.json"
    if not record.is_file():
        out = root / "demo_out"
        for site, seed in SITE_KEYS.items():
            (out / "data" / site).mkdir(parents=True)
            (out / "data" / site / "site_secret.key").write_text(hashlib.sha256(seed.encode()).hexdigest() + "\n")
        proc = subprocess.run(["make", "demo", f"DEMO_OUT={out}", f"DEMO_FLAGS={' '.join(ARGS)}"], cwd=REPOSITORY,
                              env=clean_environment(), capture_output=True, text=True, timeout=1200)
        record.write_text(json.dumps({"out": str(out), "returncode": proc.returncode, "stdout": proc.stdout,
                                      "stderr": proc.stderr}))
    saved = json.loads(record.read_text())
    run = DemoRun(Path(saved["out"]), saved["returncode"], saved["stdout"], saved["stderr"])
    assert run.returncode == 0, run.stderr[-3000:]
    return run
