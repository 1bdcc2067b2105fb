"""What a real FLARE simulator run leaves on the ledger, and what the audit commands make of it."""

from __future__ import annotations

import json
import re
import sqlite3

from audit_helpers import SITES
from phi_scan import identifiers_in_input
from clinfed.cli import main
from clinfed.ledger import LocalLedger, sha256_file


def _cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def test_final_model_file_verifies_and_every_round_has_its_model_and_both_contributions(recorded_run, capsys):
    code, out = _cli(capsys, "audit", "verify", "--ledger", str(recorded_run.ledger_path),
                     "--job", recorded_run.job_id, "--model", str(recorded_run.model_file), "--json")
    result = json.loads(out)
    assert code == 0 and result["verified"], result
    assert result["rounds"] == 2 and result["model_round"] == 1 == result["final_round"]
    assert result["model_sha256"] == sha256_file(recorded_run.model_file)
    assert result["records"] == 2 * len(SITES) + 2  # contributions + global models, nobody absent

    ledger = LocalLedger(recorded_run.ledger_path, "CoordinatorMSP")
    models = ledger.global_models(recorded_run.job_id)
    assert [(m.round, m.participants, m.expected_sites, m.recorded_by) for m in models] == [
        (r, SITES, SITES, "CoordinatorMSP") for r in (0, 1)]
    contributions = ledger.contributions(recorded_run.job_id)
    assert sorted((c.round, c.site, c.recorded_by) for c in contributions) == [
        (r, s, f"Site{s[-1]}MSP") for r in (0, 1) for s in SITES]
    assert {c.hash_stage for c in contributions} == {"after_dp"}


def test_one_changed_byte_in_the_model_file_fails_verify_naming_the_round(recorded_run, tmp_path, capsys):
    original = recorded_run.model_file.read_bytes()
    for position in (len(original) // 2, 40):  # inside the tensors, and in the file's header
        tampered = tmp_path / f"tampered_{position}.pt"
        data = bytearray(original)
        data[position] ^= 0x01
        tampered.write_bytes(bytes(data))
        code, out = _cli(capsys, "audit", "verify", "--ledger", str(recorded_run.ledger_path),
                         "--job", recorded_run.job_id, "--model", str(tampered))
        assert code == 1, out
        assert "NOT VERIFIED" in out
        assert re.search(r"problem: round 1: model file sha256 [0-9a-f]{64} differs from the recorded", out), out


def test_contribution_hash_is_of_the_bytes_the_server_received(recorded_run):
    """The server hashes each update it accepts the same canonical way and logs it: equal hashes
    mean the site recorded exactly what it sent."""
    log = (recorded_run.workspace / "server" / "log.txt").read_text()
    received = {(int(r), site): digest for r, site, digest in
                re.findall(r"round (\d+): update of (site-\d) received, sha256 ([0-9a-f]{64})", log)}
    recorded = {(c.round, c.site): c.update_sha256
                for c in LocalLedger(recorded_run.ledger_path, "CoordinatorMSP").contributions(recorded_run.job_id)}
    assert len(recorded) == 4
    assert received == recorded


def test_patient_revoked_between_rounds_is_not_in_the_next_rounds_training_set(recorded_run):
    assert not recorded_run.watcher_error, recorded_run.watcher_error
    victim = recorded_run.victim
    assert victim is not None and recorded_run.revoked_after_round == 0
    cohort = {line["round"]: line for line in recorded_run.cohort_log("site-1") if line["task"] == "train"}
    assert victim in cohort[0]["train"]
    assert victim not in cohort[1]["train"] and victim not in cohort[1]["validation"]
    assert victim in cohort[1]["excluded"]["consent revoked on ledger"]
    assert cohort[1]["n_excluded"] == cohort[0]["n_excluded"] + 1
    assert cohort[1]["n_train"] == cohort[0]["n_train"] - 1
    # site-2 is not affected
    other = {line["round"]: line for line in recorded_run.cohort_log("site-2") if line["task"] == "train"}
    assert other[0]["train"] == other[1]["train"]
    # Only pseudonyms in the cohort log.
    for line in recorded_run.cohort_log("site-1"):
        for name in line["train"] + line["validation"] + sum(line["excluded"].values(), []):
            assert re.fullmatch(r"p-[0-9a-f]{32}", name)


def test_consent_exclusions_and_cohort_are_recorded_with_the_contribution(recorded_run):
    ledger = LocalLedger(recorded_run.ledger_path, "Site1MSP")  # a consent's history is its own site's to read
    by_round = {c.round: c for c in ledger.contributions(recorded_run.job_id) if c.site == "site-1"}
    # The site's own log has the exact counts; what it releases to the ledger is rounded up to 5
    # (clinfed.privacy.release), so one revocation does not show as a difference of one.
    cohort = {line["round"]: line for line in recorded_run.cohort_log("site-1") if line["task"] == "train"}
    assert cohort[1]["n_excluded"] == cohort[0]["n_excluded"] + 1
    for round_ in (0, 1):
        assert by_round[round_].metrics["consent_excluded"] == -(-cohort[round_]["n_excluded"] // 5) * 5
        assert by_round[round_].n_samples == by_round[round_].metrics["cohort_train"] == \
            -(-cohort[round_]["n_train"] // 5) * 5
    history = ledger.history("consent", study="clinfed-tumour-seg", pseudonym=recorded_run.victim)
    assert [h.value["status"] for h in history] == ["active", "revoked"]
    assert all(h.value["recorded_by"] == "Site1MSP" for h in history)


def test_no_patient_identifier_but_the_pseudonym_reaches_the_ledger(recorded_run):
    identifiers = set()
    for site in SITES:
        identifiers |= identifiers_in_input(recorded_run.data_dir / site)
    assert len(identifiers) > 10 * len(SITES)
    texts = []
    with sqlite3.connect(recorded_run.ledger_path) as conn:
        for table in ("blocks", "meta"):
            for row in conn.execute(f"SELECT * FROM {table}"):
                texts += [bytes(v).decode("utf-8", "replace") if isinstance(v, (bytes, memoryview)) else str(v)
                          for v in row]
    text = "\n".join(texts)
    assert re.search(r"p-[0-9a-f]{32}", text)  # the consents are there, by pseudonym
    assert sorted(v for v in identifiers if v in text) == []
    # The files themselves (database, WAL, outbox journals), for the longer identifiers.
    raw = b"".join(p.read_bytes() for p in recorded_run.root.glob("ledger.sqlite*") if p.is_file())
    raw += b"".join(p.read_bytes() for p in recorded_run.root.glob("ledger.sqlite.outbox/*") if p.is_file())
    assert sorted(v for v in identifiers if len(v) >= 8 and v.encode() in raw) == []


def test_audit_commands_print_tables_for_people_and_json_for_scripts(recorded_run, capsys):
    ledger = str(recorded_run.ledger_path)
    code, out = _cli(capsys, "audit", "contributions", "--ledger", ledger, "--job", recorded_run.job_id)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["round", "site", "update"] and "site-2" in out
    code, out = _cli(capsys, "audit", "contributions", "--ledger", ledger, "--job", recorded_run.job_id, "--json")
    assert len(json.loads(out)) == 4
    code, out = _cli(capsys, "audit", "models", "--ledger", ledger, "--job", recorded_run.job_id, "--json")
    assert [m["round"] for m in json.loads(out)] == [0, 1]
    code, out = _cli(capsys, "audit", "consents", "--ledger", ledger, "--as", "site-1", "--site", "site-1", "--json")
    consents = json.loads(out)
    assert {c["status"] for c in consents if c["pseudonym"] == recorded_run.victim} == {"revoked"}
    code, out = _cli(capsys, "audit", "consents", "--ledger", ledger, "--as", "site-1", "--pseudonym",
                     recorded_run.victim)
    assert [line.split()[3] for line in out.splitlines()[2:]] == ["active", "revoked"]
    # The coordinator (and any other site) sees site-1's consents as commitments and counts only.
    code, out = _cli(capsys, "audit", "consents", "--ledger", ledger, "--as", "site-2", "--site", "site-1", "--json")
    assert code == 0 and consents and all("pseudonym" not in c and "status" not in c for c in json.loads(out))
    assert {c["consent_commitment"] for c in json.loads(out)} == {c["consent_commitment"] for c in consents}
    code, out = _cli(capsys, "audit", "consents", "--ledger", ledger, "--counts", "--json")
    assert json.loads(out)["site-1"]["revoked"] == 1
    code, out = _cli(capsys, "audit", "watch", "--ledger", ledger, "--from-block", "0", "--no-follow", "--json")
    names = [json.loads(line)["name"] for line in out.splitlines()]
    assert names[0] == "ConsortiumInitialised" and names.count("GlobalModelRecorded") == 2
    assert names.count("ContributionRecorded") == 4 and "ConsentRecorded" in names


def test_best_model_file_verifies_as_the_round_it_was_saved_from(recorded_run, capsys):
    best = next(recorded_run.server_run_dir.rglob("best_FL_global_model.pt"))
    code, out = _cli(capsys, "audit", "verify", "--ledger", str(recorded_run.ledger_path),
                     "--job", recorded_run.job_id, "--model", str(best), "--json")
    result = json.loads(out)
    assert code == 0 and result["verified"] and result["matched_rounds"], result
    assert result["model_round"] == result["matched_rounds"][-1]
