"""Bad input to the ledger files and the ledger CLI options (part of issue 14's corpus): each is
refused with a message naming the file, field or identity, exit code 2 and no traceback, and the
good input beside it still works."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from clinfed.cli import main
from clinfed.ledger import Contribution, LocalLedger
from clinfed.ledger.pki import identities_dir
from ledger_helpers import COORDINATOR, SITES, digest, new_local_ledger


@pytest.fixture
def ledger(tmp_path) -> Path:
    path = new_local_ledger(tmp_path / "ledger.sqlite")
    with LocalLedger(path, SITES["site-1"]) as site:
        site.record_contribution(Contribution("job-ok", 0, "site-1", digest("u"), 4))
    return path


def site_config(tmp_path: Path, ledger: Path, participant: str, **changes) -> Path:
    """A participant's clinfed_site.json naming its own (simulator) identity files."""
    own = identities_dir(ledger) / participant
    section = {"participant": participant, "backend": "local", "path": str(ledger),
               "msp_id": {**SITES, "coordinator": COORDINATOR}[participant], "cert": str(own / "cert.pem"),
               "key": str(own / "key.pem"), "ca": str(identities_dir(ledger) / "ca.pem"), "outbox": ""}
    section.update(changes)
    section = {k: v for k, v in section.items() if v is not None}
    path = tmp_path / f"{participant}_site.json"
    path.write_text(json.dumps({"data_dir": str(tmp_path), "ledger": section}))
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def test_a_mistyped_ledger_path_is_an_error_not_an_empty_ledger(ledger, capsys):
    wrong = ledger.with_name("ledgr.sqlite")
    code, out, err = run(capsys, "audit", "models", "--ledger", wrong, "--job", "job-ok")
    assert code == 2 and f"--ledger {wrong}: no ledger file there" in err and not wrong.exists()
    assert run(capsys, "audit", "contributions", "--ledger", ledger, "--job", "job-ok")[0] == 0


def test_a_missing_ledger_path_in_a_site_config_is_an_error(ledger, tmp_path, capsys):
    config = site_config(tmp_path, ledger, "site-1", path=str(tmp_path / "nowhere.sqlite"))
    code, _, err = run(capsys, "audit", "models", "--site-config", config, "--job", "job-ok")
    assert code == 2 and "nowhere.sqlite: no ledger file here" in err
    assert not (tmp_path / "nowhere.sqlite").exists()


def test_as_another_participant_than_the_site_config_holds_is_refused(ledger, tmp_path, capsys):
    config = site_config(tmp_path, ledger, "site-1")
    code, _, err = run(capsys, "audit", "contributions", "--site-config", config, "--as", "site-2", "--job", "job-ok")
    assert code == 2 and f"--as/--site site-2: {config} holds the ledger identity of site-1" in err
    code, out, _ = run(capsys, "audit", "contributions", "--site-config", config, "--as", "site-1", "--job", "job-ok",
                       "--json")
    assert code == 0 and [r["site"] for r in json.loads(out)] == ["site-1"]


def test_keys_register_for_another_site_without_its_credential_is_refused(ledger, tmp_path, capsys):
    shutil.rmtree(identities_dir(ledger) / "site-2")  # as on a provisioned ledger: site-2's key is at site-2
    code, _, err = run(capsys, "keys", "register", "--site", "site-2", "--ledger", ledger,
                       "--key-file", tmp_path / "stolen.pem")
    assert code == 2 and "no credential for Site2MSP" in err
    assert "site-2" not in LocalLedger(ledger, COORDINATOR).site_keys()
    code, _, _ = run(capsys, "keys", "register", "--site", "site-1", "--ledger", ledger,
                     "--key-file", tmp_path / "site1.pem")
    assert code == 0 and "site-1" in LocalLedger(ledger, COORDINATOR).site_keys()


def test_keys_register_for_another_site_with_ones_own_site_config_is_refused(ledger, tmp_path, capsys):
    config = site_config(tmp_path, ledger, "site-1")
    code, _, err = run(capsys, "keys", "register", "--site", "site-2", "--site-config", config,
                       "--key-file", tmp_path / "stolen.pem")
    assert code == 2 and "holds the ledger identity of site-1, not of site-2" in err
    assert "site-2" not in LocalLedger(ledger, COORDINATOR).site_keys()


def test_consent_sync_for_another_site_is_refused(ledger, tmp_path, capsys):
    config = site_config(tmp_path, ledger, "site-1")
    code, _, err = run(capsys, "consent", "sync", tmp_path, "--site", "site-2", "--site-config", config)
    assert code == 2 and "not of site-2" in err


def test_a_text_file_as_ledger_is_not_a_ledger(tmp_path, capsys):
    text = tmp_path / "notes.sqlite"
    text.write_text("these are not blocks\n")
    code, _, err = run(capsys, "audit", "models", "--ledger", text, "--job", "j")
    assert code == 2 and f"{text}:" in err and ("not a clinfed ledger" in err or "no credential" in err)


def test_an_older_schema_is_named(ledger, capsys):
    with sqlite3.connect(ledger) as conn:
        conn.execute("UPDATE meta SET value = '1' WHERE name = 'schema'")
    code, _, err = run(capsys, "audit", "models", "--ledger", ledger, "--job", "job-ok")
    assert code == 2 and "ledger schema 1 is not the supported 2" in err


@pytest.mark.parametrize("missing", ["cert", "key", "ca"])
def test_a_partial_identity_in_the_site_config_names_what_is_missing(ledger, tmp_path, capsys, missing):
    config = site_config(tmp_path, ledger, "site-1", **{missing: None})
    code, _, err = run(capsys, "audit", "models", "--site-config", config, "--job", "job-ok")
    assert code == 2 and "needs 'cert', 'key' and 'ca' together" in err


def test_a_key_that_is_not_the_certificates_is_refused(ledger, tmp_path, capsys):
    other_key = identities_dir(ledger) / "site-2" / "key.pem"
    config = site_config(tmp_path, ledger, "site-1", key=str(other_key))
    code, _, err = run(capsys, "audit", "models", "--site-config", config, "--job", "job-ok")
    assert code == 2 and f"{other_key}: this key does not belong to the certificate" in err


def test_an_unreadable_certificate_is_named(ledger, tmp_path, capsys):
    bad = tmp_path / "cert.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    config = site_config(tmp_path, ledger, "site-1", cert=str(bad))
    code, _, err = run(capsys, "audit", "models", "--site-config", config, "--job", "job-ok")
    assert code == 2 and f"{bad}: not a PEM X.509 certificate" in err


def test_a_ledger_made_under_another_ca_is_refused(ledger, tmp_path, capsys):
    other = new_local_ledger(tmp_path / "other" / "ledger.sqlite")
    config = site_config(tmp_path, ledger, "site-1", path=str(other))
    code, _, err = run(capsys, "audit", "models", "--site-config", config, "--job", "job-ok")
    assert code == 2 and "was created for another consortium CA" in err


def test_a_foreign_certificate_in_the_site_config_cannot_sign(ledger, tmp_path, capsys):
    other = new_local_ledger(tmp_path / "other" / "ledger.sqlite")
    foreign = identities_dir(other) / "site-1"
    config = site_config(tmp_path, ledger, "site-1", cert=str(foreign / "cert.pem"), key=str(foreign / "key.pem"))
    code, _, err = run(capsys, "audit", "models", "--site-config", config, "--job", "job-ok")
    assert code == 2 and "no CA of this consortium issued" in err


def test_an_unreadable_head_record_is_named(ledger, tmp_path, capsys):
    head = tmp_path / "head.json"
    head.write_text("{not json")
    config = site_config(tmp_path, ledger, "site-1", head_file=str(head))
    code, _, err = run(capsys, "audit", "models", "--site-config", config, "--job", "job-ok")
    assert code == 2 and f"{head}: this participant's record of the ledger head is unreadable" in err


def test_unknown_ledger_config_fields_are_named(ledger, tmp_path, capsys):
    config = site_config(tmp_path, ledger, "site-1", certificate="x")
    code, _, err = run(capsys, "audit", "models", "--site-config", config, "--job", "job-ok")
    assert code == 2 and "unknown field(s) certificate" in err


def test_an_unknown_backend_is_named(ledger, tmp_path, capsys):
    config = site_config(tmp_path, ledger, "site-1", backend="sqlite")
    code, _, err = run(capsys, "audit", "models", "--site-config", config, "--job", "job-ok")
    assert code == 2 and "backend must be one of local, fabric, got 'sqlite'" in err


def test_a_fabric_ledger_without_tls_is_refused(tmp_path, capsys):
    config = tmp_path / "site.json"
    config.write_text(json.dumps({"data_dir": str(tmp_path), "ledger": {
        "participant": "site-1", "backend": "fabric", "endpoint": "127.0.0.1:7051", "msp_dir": str(tmp_path)}}))
    code, _, err = run(capsys, "audit", "models", "--site-config", config, "--job", "j")
    assert code == 2 and "'tls_root_cert' is required for backend 'fabric'" in err and "plaintext is refused" in err


def test_a_site_config_whose_ledger_is_not_an_object_is_named(tmp_path, capsys):
    config = tmp_path / "site.json"
    config.write_text(json.dumps({"data_dir": str(tmp_path), "ledger": ["local"]}))
    code, _, err = run(capsys, "audit", "models", "--site-config", config, "--as", "site-1", "--job", "j")
    assert code == 2 and f"{config}: field 'ledger' must be an object" in err


def test_a_missing_site_config_is_named(tmp_path, capsys):
    code, _, err = run(capsys, "audit", "models", "--site-config", tmp_path / "nope.json", "--job", "j")
    assert code == 2 and "nope.json: site config not found" in err


def test_a_ledger_json_that_is_not_json_is_named(tmp_path, capsys):
    config = tmp_path / "ledger.json"
    config.write_text("{backend: local")
    code, _, err = run(capsys, "audit", "models", "--ledger", config, "--job", "j")
    assert code == 2 and f"{config}" in err and "not valid JSON" in err


def test_audit_watch_on_a_damaged_ledger_names_the_block(ledger, capsys):
    with sqlite3.connect(ledger) as conn:
        conn.execute("DELETE FROM blocks WHERE number = 1")
    code, _, err = run(capsys, "audit", "watch", "--ledger", ledger, "--from-block", "0", "--no-follow")
    assert code == 2 and "block 1 fails verification: it is missing" in err
