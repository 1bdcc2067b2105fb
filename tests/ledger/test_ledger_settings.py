"""Which ledger, as whom: each participant's ledger and identity (``clinfed.ledger.settings``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clinfed.errors import ConfigError
from clinfed.ledger import OutboxLedger
from clinfed.ledger.settings import DEFAULT_OUTBOX, LEDGER_ENV, ledger_settings, msp_id_for


def test_msp_ids_follow_the_consortium_convention():
    assert msp_id_for("site-1") == "Site1MSP"
    assert msp_id_for("coordinator") == "CoordinatorMSP"
    assert msp_id_for("hospital_b-2") == "HospitalB2MSP"


def test_site_config_ledger_wins_over_the_environment_and_paths_are_its_own(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "clinfed_site.json").write_text(json.dumps(
        {"data_dir": "/data", "ledger": {"backend": "local", "path": "ledger.sqlite", "msp_id": "HospitalOneMSP"}}))
    env = {LEDGER_ENV: str(tmp_path / "shared.sqlite")}
    settings = ledger_settings("site-1", site_config_dir=local, env=env)
    assert settings.msp_id == "HospitalOneMSP" and settings.source.endswith("clinfed_site.json")
    assert settings.config["outbox"] == DEFAULT_OUTBOX and settings.base_dir == local
    # Without a ledger section, the environment decides.
    (local / "clinfed_site.json").write_text(json.dumps({"data_dir": "/data"}))
    settings = ledger_settings("site-1", site_config_dir=local, env=env)
    assert settings.msp_id == "Site1MSP" and settings.config["path"] == env[LEDGER_ENV]
    assert settings.config["outbox"].endswith("shared.sqlite.outbox/site-1.jsonl")
    assert ledger_settings("site-1", site_config_dir=local, env={}) is None
    (local / "clinfed_site.json").write_text(json.dumps({"ledger": ["not", "an", "object"]}))
    with pytest.raises(ConfigError, match="'ledger' must be an object"):
        ledger_settings("site-1", site_config_dir=local, env=env)


def test_json_ledger_config_gives_each_participant_its_identity_and_outbox(tmp_path):
    from clinfed.ledger import LocalLedger
    from clinfed.ledger.pki import create_simulation_identities, simulation_identity_files, simulation_membership

    create_simulation_identities(tmp_path / "l.sqlite", {"coordinator": "LeadMSP", "site-1": "Site1MSP"})
    lead = simulation_identity_files(tmp_path / "l.sqlite", "coordinator").load("LeadMSP")
    LocalLedger.create(tmp_path / "l.sqlite", lead, simulation_membership(tmp_path / "l.sqlite")).close()
    config = tmp_path / "ledger.json"
    config.write_text(json.dumps({"backend": "local", "path": "l.sqlite", "outbox_dir": "outbox", "policy": "strict",
                                  "msp_ids": {"coordinator": "LeadMSP"},
                                  "participants": {"site-2": {"msp_id": "OtherMSP"}}}))
    env = {LEDGER_ENV: str(config)}
    coordinator = ledger_settings("coordinator", env=env)
    assert (coordinator.msp_id, coordinator.config["outbox"]) == ("LeadMSP", str(Path("outbox") / "coordinator.jsonl"))
    assert ledger_settings("site-1", env=env).msp_id == "Site1MSP"
    assert ledger_settings("site-2", env=env).msp_id == "OtherMSP"
    ledger = coordinator.open()
    try:
        assert isinstance(ledger, OutboxLedger) and ledger.policy == "strict"
        assert ledger.backend.path == tmp_path / "l.sqlite"
    finally:
        ledger.close()
    assert coordinator.with_policy("async").open(outbox=False).msp_id == "LeadMSP"
