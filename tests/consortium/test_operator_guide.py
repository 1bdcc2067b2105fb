"""The README's operator guide runs as written: every ``bash`` and ``python`` snippet, in order, in
a scratch folder, with its relative paths made absolute. Then no patient identifier of the sites'
input is in anything the run printed or wrote (CLI output, logs, status, ledger, job results).

Test-only changes, each asserted to apply: tiny synthetic hospitals, a free port, and a tiny
variant of ``jobs/tumour_seg_private`` (the same recipe and privacy, one round) in the scratch
folder's ``jobs/``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from consortium_helpers import CONSORTIUM_YML, export_tumour_seg_private, free_port
from phi_scan import identifiers_in_input, leaks_in_text, leaks_in_tree

from clinfed.jobs.tumour_seg import PRIVATE_JOB_NAME

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)


def operator_guide_snippets() -> list[tuple[str, str]]:
    """(language, code) of each ``bash``/``python`` block of the README's operator guide."""
    readme = (REPO / "README.md").read_text()
    guide = readme[readme.index("## Operator guide"):readme.index("### Troubleshooting")]
    return re.findall(r"```(bash|python)\n(.*?)```", guide, flags=re.DOTALL)


def made_absolute(code: str, work: Path) -> str:
    """Relative paths of the guide (``data/``, ``consortium/``, ``jobs/``, ``provisioning/``) made
    absolute under ``work``."""
    return re.sub(r"(?<![\w/.$-])(data|consortium|jobs|provisioning)/", lambda m: f"{work}/{m.group(1)}/", code)


def with_test_settings(code: str, port: int) -> str:
    replacements = {"clinfed data synth --out data/ --sites 4":
                    "clinfed data synth --out data/ --sites 4 --patients 10 --shape 32,32,16 --seed 1",
                    "--port 8102": f"--port {port}"}
    for old, new in replacements.items():
        code = code.replace(old, new)
    return code


def test_snippets_are_the_ones_this_test_adapts():
    """If the guide changes, this test must change with it (and not silently run less)."""
    snippets = operator_guide_snippets()
    languages = [language for language, _ in snippets]
    assert languages.count("python") == 1 and languages.count("bash") >= 7, languages
    text = "\n".join(code for _, code in snippets)
    for needed in ("clinfed data synth --out data/ --sites 4\n", "--port 8102", "jobs/tumour_seg_private",
                   "consortium up consortium/", "consortium down consortium/", "session.submit_job(str(Path("):
        assert needed in text, needed


def test_operator_guide_runs_as_written_and_leaks_no_identifier(tmp_path):
    work = tmp_path / "guide"
    (work / "provisioning").mkdir(parents=True)
    shutil.copyfile(CONSORTIUM_YML, work / "provisioning" / "consortium.yml")
    export_tumour_seg_private(work / "jobs", name=PRIVATE_JOB_NAME, num_rounds=1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    for name in ("CLINFED_LEDGER", "CLINFED_DATA_ROOT", "CLINFED_JOB_ID"):
        env.pop(name, None)
    port = free_port()
    printed: list[str] = []
    try:
        for language, code in operator_guide_snippets():
            code = made_absolute(with_test_settings(code, port), work)
            command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
            started = time.monotonic()
            proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            printed.append(proc.stdout + proc.stderr)
            print(f"{time.monotonic() - started:6.1f} s  {code.strip().splitlines()[0][:100]}")
            assert proc.returncode == 0, f"{language} snippet failed:\n{code}\n--- output:\n{printed[-1][-4000:]}"
            if language == "python":
                job_id, status = re.search(r"^job (\S+) (\S+)$", proc.stdout, re.MULTILINE).groups()
                assert status == "FINISHED:COMPLETED", printed[-1][-4000:]
                env["JOB_ID"] = job_id
                env["RESULT"] = re.search(r"^result (.+)$", proc.stdout, re.MULTILINE).group(1)
    finally:
        if (work / "consortium" / "provisioning.json").is_file():
            subprocess.run([sys.executable, "-m", "clinfed.cli", "consortium", "down", str(work / "consortium")],
                           env=env, capture_output=True, timeout=120)
    output = "\n".join(printed)
    assert re.search(rf"^job {env['JOB_ID']}: VERIFIED$", output, re.MULTILINE), output[-3000:]
    assert "Traceback" not in output

    # The leak scan: the sites' identifiers against everything the run printed or wrote.
    sites = sorted(p for p in (work / "data").iterdir() if p.is_dir())
    identifiers = set().union(*(identifiers_in_input(site) for site in sites))
    assert len(sites) == 4 and len(identifiers) > 400
    assert leaks_in_text(identifiers, output) == set()
    written = leaks_in_tree(identifiers, work / "consortium")
    written.update(leaks_in_tree(identifiers, Path(env["RESULT"])))
    assert written == {}, written
