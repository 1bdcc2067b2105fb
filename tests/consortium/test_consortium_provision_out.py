"""``consortium provision --out`` must be a new or empty folder, and a provisioning that fails
(or is interrupted) removes everything it wrote: no half-made consortium is left to start."""

from __future__ import annotations

import json

import pytest
from consortium_helpers import CONSORTIUM_YML

from clinfed.cli import main
from clinfed.consortium import provision as provision_module


def _provision(capsys, out, *extra) -> tuple[int, str]:
    code = main(["consortium", "provision", str(CONSORTIUM_YML), "--out", str(out), "--json", *extra])
    return code, capsys.readouterr().err


def test_out_holding_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the lead's notes")
    code, err = _provision(capsys, out)
    assert code == 2 and f"{out}: --out must be a new or empty folder; it holds 1 entries" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "the lead's notes"


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("x")
    code, err = _provision(capsys, out)
    assert code == 2 and f"{out}: --out is a file" in err and out.read_text() == "x"


@pytest.fixture
def broken_nvflare(tmp_path, monkeypatch):
    """A broken FLARE install for the ``nvflare provision`` subprocess (it inherits PYTHONPATH)."""
    shadow = tmp_path / "shadow" / "nvflare"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('this nvflare install is broken')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))


def test_failed_provisioning_removes_the_folders_it_created(tmp_path, capsys, broken_nvflare):
    out = tmp_path / "new" / "deeper" / "out"
    code, err = _provision(capsys, out)
    assert code == 2 and "nvflare provision failed" in err and "this nvflare install is broken" in err
    assert "Traceback" not in err.splitlines()[0]
    assert not (tmp_path / "new").exists(), "the folders provisioning created must be gone"


def test_interrupted_provisioning_empties_the_folder_it_was_given_which_then_provisions(tmp_path, capsys,
                                                                                         monkeypatch):
    out = tmp_path / "out"
    out.mkdir()

    def interrupted(*args, **kwargs):  # the last step, after the kits and local files are written
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(provision_module, "init_local_ledger", interrupted)
        code, err = _provision(capsys, out)
    assert code == 130
    assert out.is_dir() and list(out.iterdir()) == [], "the caller's folder stays, and only it"

    # The same empty folder provisions now (an empty --out is accepted).
    code, err = _provision(capsys, out)
    assert code == 0, err
    assert json.loads((out / "provisioning.json").read_text())["sites"] == ["site-1", "site-2", "site-3", "site-4"]
    # ... and is refused a second time, naming the earlier provisioning.
    code, err = _provision(capsys, out)
    assert code == 2 and "it holds an earlier provisioning" in err
