"""Every user error of ``clinfed`` is one line naming the file, with a non-zero exit and no
traceback; where other input is good (other sites of ``data check``) it is still processed, and
nothing is written over the bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clinfed.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("clinfed: error: ")]


def assert_one_line_error(err: str, *names: str) -> str:
    """Exactly one error line, naming every one of ``names``; no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- data check


def test_multi_site_check_reports_every_site_and_fails_if_one_failed(sites, capsys):
    missing = sites / "site-9"
    code, out, err = run(capsys, "data", "check", sites / "site-1", missing, sites / "site-3", "--json")
    assert code == 2
    assert_one_line_error(err, missing, "not a site folder")
    reports = json.loads(out)
    assert [r.get("site") for r in reports] == ["site-1", None, "site-3"]
    assert reports[1] == {"site_dir": str(missing), "error": error_lines(err)[0].removeprefix("clinfed: error: ")}
    assert reports[0]["usable"] > 0 and reports[2]["usable"] > 0  # the good sites were ingested


def test_all_good_sites_exit_0(tiny_sites, capsys):
    code, out, err = run(capsys, "data", "check", tiny_sites / "site-1", tiny_sites / "site-2")
    assert code == 0 and not error_lines(err)
    assert "== site-1" in out and "== site-2" in out


def _binary_key(site: Path) -> Path:
    (site / "site_secret.key").write_bytes(bytes(range(128, 256)))
    return site / "site_secret.key"


def _text_key(site: Path) -> Path:
    (site / "site_secret.key").write_text("this is not hex\n")
    return site / "site_secret.key"


def _key_is_a_folder(site: Path) -> Path:
    (site / "site_secret.key").unlink()
    (site / "site_secret.key").mkdir()
    return site / "site_secret.key"


def _no_key(site: Path) -> Path:
    (site / "site_secret.key").unlink()
    return site / "site_secret.key"


def _short_key(site: Path) -> Path:
    (site / "site_secret.key").write_text("abcd\n")
    return site / "site_secret.key"


def _not_a_site(site: Path) -> Path:
    for child in ("imaging", "fhir"):
        os.rename(site / child, site / f"old_{child}")
    return site


BAD_SITES = [
    ("site key is binary", _binary_key, "must be hex-encoded"),
    ("site key is not hex", _text_key, "must be hex-encoded"),
    ("site key is a folder", _key_is_a_folder, "key not found"),
    ("site key missing", _no_key, "key not found"),
    ("site key too short", _short_key, "shorter than 16 bytes"),
    ("not a site folder", _not_a_site, "not a site folder"),
]


@pytest.mark.parametrize("case,damage,problem", BAD_SITES, ids=[c[0] for c in BAD_SITES])
def test_bad_site_among_good_ones_is_named_and_the_others_checked(sites, capsys, case, damage, problem):
    named = damage(sites / "site-2")
    code, out, err = run(capsys, "data", "check", sites / "site-1", sites / "site-2", sites / "site-3")
    assert code == 2
    assert_one_line_error(err, named, problem)
    assert "== site-1" in out and "== site-3" in out and "site-2: NOT CHECKED" in out
    assert "2 of 3 site(s) checked; 1 could not be" in err


def test_missing_secret_file_option_is_named(tiny_sites, tmp_path, capsys):
    code, _, err = run(capsys, "data", "check", tiny_sites / "site-1", "--secret-file", tmp_path / "nope.key")
    assert code == 2
    assert_one_line_error(err, tmp_path / "nope.key", "not found")


def test_real_entry_point_prints_no_traceback(sites):
    """The installed ``clinfed`` script, as an operator runs it."""
    _binary_key(sites / "site-1")
    clinfed = Path(sys.executable).parent / "clinfed"
    proc = subprocess.run([str(clinfed), "data", "check", str(sites / "site-1"), str(sites / "site-2")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, sites / "site-1" / "site_secret.key")
    assert "== site-2" in proc.stdout


# --------------------------------------------------------------------------- ledger files


@pytest.fixture
def corrupt_ledger(tmp_path) -> Path:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(os.urandom(8192))
    return path


@pytest.mark.parametrize("argv", [["audit", "models", "--job", "j"], ["audit", "contributions", "--job", "j"],
                                  ["audit", "consents"], ["audit", "verify", "--job", "j"],
                                  ["audit", "watch", "--no-follow", "--from-block", "0"]],
                         ids=lambda argv: " ".join(argv[:2]))
def test_damaged_ledger_file_is_named_and_left_untouched(corrupt_ledger, capsys, argv):
    before = corrupt_ledger.read_bytes()
    code, _, err = run(capsys, *argv, "--ledger", corrupt_ledger)
    assert code == 2
    assert_one_line_error(err, corrupt_ledger)
    assert corrupt_ledger.read_bytes() == before


LEDGER_CONFIGS = [
    ("duplicate key", '{"backend": "local", "path": "a.sqlite", "path": "b.sqlite"}', "duplicate key 'path'"),
    ("not JSON", '{"backend": "local",\n "path": }', ":2: not valid JSON"),
    ("a list", '["local"]', "must hold a JSON object"),
    ("NaN", '{"backend": "local", "retry_interval": NaN}', "NaN is not a JSON number"),
]


@pytest.mark.parametrize("case,text,problem", LEDGER_CONFIGS, ids=[c[0] for c in LEDGER_CONFIGS])
def test_bad_ledger_config_json_is_named(tmp_path, capsys, case, text, problem):
    config = tmp_path / "ledger.json"
    config.write_text(text)
    code, _, err = run(capsys, "audit", "models", "--job", "j", "--ledger", config)
    assert code == 2
    assert_one_line_error(err, config, problem)
    assert not (tmp_path / "a.sqlite").exists() and not (tmp_path / "b.sqlite").exists()


SITE_CONFIGS = [
    ("missing", None, "not found"),
    ("not JSON", '{"ledger": {"backend": "local"}', "not valid JSON"),
    ("no ledger section", '{"data_dir": "/data"}', "has no 'ledger' section"),
    ("ledger not an object", '{"data_dir": "/data", "ledger": "local"}', "field 'ledger' must be an object"),
    ("duplicate key", '{"ledger": {"backend": "local"}, "ledger": {"backend": "fabric"}}', "duplicate key 'ledger'"),
]


@pytest.mark.parametrize("case,text,problem", SITE_CONFIGS, ids=[c[0] for c in SITE_CONFIGS])
def test_bad_site_config_for_the_ledger_is_named(tmp_path, capsys, case, text, problem):
    config = tmp_path / "clinfed_site.json"
    if text is not None:
        config.write_text(text)
    code, _, err = run(capsys, "audit", "contributions", "--job", "j", "--site-config", config)
    assert code == 2
    assert_one_line_error(err, config, problem)


def test_masking_key_file_that_is_a_folder_or_garbage_is_named(tmp_path, capsys, corrupt_ledger):
    # The key is read before the ledger is touched, so even a damaged ledger is not reached.
    code, _, err = run(capsys, "keys", "register", "--site", "site-1", "--key-file", tmp_path, "--ledger",
                       corrupt_ledger)
    assert code == 2
    assert_one_line_error(err, tmp_path)
    garbage = tmp_path / "masking_key.pem"
    garbage.write_bytes(os.urandom(300))
    garbage.chmod(0o600)
    code, _, err = run(capsys, "keys", "register", "--site", "site-1", "--key-file", garbage, "--ledger",
                       corrupt_ledger)
    assert code == 2
    assert_one_line_error(err, garbage)


# --------------------------------------------------------------------------- consortium and output folders


def test_consortium_commands_on_an_unprovisioned_folder_name_the_state_file(tmp_path, capsys):
    for command in ("up", "down", "status"):
        code, _, err = run(capsys, "consortium", command, tmp_path)
        assert code == 2
        assert_one_line_error(err, tmp_path, "no provisioning.json")


@pytest.mark.parametrize("text,problem", [('{"consortium": "x",\n', ":2: not valid JSON"),
                                          ("[]", "must hold a JSON object")])
def test_damaged_provisioning_state_is_named(tmp_path, capsys, text, problem):
    (tmp_path / "provisioning.json").write_text(text)
    for command in ("up", "down", "status"):
        code, _, err = run(capsys, "consortium", command, tmp_path)
        assert code == 2
        assert_one_line_error(err, tmp_path / "provisioning.json", problem)


@pytest.mark.parametrize("argv", [["demo", "--quick", "--out", "{file}/out"],
                                  ["data", "synth", "--sites", "1", "--patients", "1", "--out", "{file}/out"],
                                  ["jobs", "export", "--jobs-dir", "{file}"]],
                         ids=["demo", "data synth", "jobs export"])
def test_output_folder_that_is_a_file_is_named(tmp_path, capsys, argv):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    code, _, err = run(capsys, *[a.format(file=blocker) for a in argv])
    assert code == 2
    assert_one_line_error(err, blocker)
    assert blocker.read_text() == "keep me"


def test_jobs_check_of_a_missing_folder_is_named(tmp_path, capsys):
    code, _, err = run(capsys, "jobs", "check", tmp_path / "nope")
    assert code == 1
    assert_one_line_error(err, tmp_path / "nope", "not a folder")
