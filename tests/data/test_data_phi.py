"""Issue item 6: what a site hands to training carries pseudonyms only, never an identifier
from its DICOM or FHIR input."""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import shutil

from data_helpers import active_indices, pseudonyms
from phi_scan import date_spellings, identifiers_in_input

from clinfed.data.ingest import ingest_site
from clinfed.data.pseudonym import SECRET_FILE_NAME, Pseudonymiser


def test_cases_report_and_fhir_issues_carry_no_identifier_from_the_input(site_copy):
    # Damage some patients too, so error details are part of what is checked.
    victims = active_indices(site_copy.truth)[1:4]
    shutil.copy(site_copy.study(victims[1]) / "seg.dcm", site_copy.study(victims[0]) / "seg.dcm")
    shutil.copy(site_copy.study(victims[0]) / "slice_0002.dcm", site_copy.study(victims[1]) / "slice_0009.dcm")
    patient_file = site_copy.dir / "fhir" / "Patient.ndjson"
    mrn = site_copy.truth[victims[2]].patient.mrn
    patient_file.write_text(patient_file.read_text(encoding="utf-8").replace(
        f'"value":"{mrn}"', f'"value":{mrn}'), encoding="utf-8")  # MRN as a number: invalid R4

    identifiers = identifiers_in_input(site_copy.dir)
    truth = {value for case in site_copy.truth for p in [case.patient]
             for value in (p.mrn, p.family_name, p.given_name, p.study_uid, p.series_uid,
                           *date_spellings(p.birth_date.isoformat()))}
    assert truth <= identifiers  # the reader of the input files misses nothing we know of

    result = ingest_site(site_copy.dir)
    assert len(result.cases) == len(active_indices(site_copy.truth)) - 3
    assert result.fhir_issues and len(result.exclusions) >= 3

    arrays: list[bytes] = []
    stream = pickle.dumps(result.cases, protocol=5,
                          buffer_callback=lambda b: arrays.append(bytes(b.raw())))
    sent = b"\n".join([stream, repr(result.cases).encode(),
                       json.dumps(result.report(), ensure_ascii=False).encode(),
                       "\n".join(result.fhir_issues).encode()])
    assert pickle.loads(stream, buffers=arrays)[0].pseudonym == result.cases[0].pseudonym

    leaked = sorted(v for v in identifiers if v.encode() in sent)
    assert leaked == []
    # Pixel and label buffers are searched for the long identifiers only: a 3-letter name
    # occurs in random bytes by chance.
    leaked = sorted(v for v in identifiers if len(v) >= 8 and any(v.encode() in b for b in arrays))
    assert leaked == []


def test_pseudonym_is_truncated_hmac_sha256_of_the_mrn_under_the_site_key(site_copy):
    key = bytes.fromhex((site_copy.dir / SECRET_FILE_NAME).read_text().strip())
    names = pseudonyms(site_copy.dir, site_copy.truth)
    for case, name in zip(site_copy.truth, names):
        digest = hmac.new(key, case.patient.mrn.encode("utf-8"), hashlib.sha256).hexdigest()
        assert name == "p-" + digest[:32]  # 128 bits, as documented in clinfed.data.pseudonym
    assert len(set(names)) == len(names)
    result = ingest_site(site_copy.dir)
    assert {c.pseudonym for c in result.cases} == {names[i] for i in active_indices(site_copy.truth)}


def test_same_mrn_under_another_site_key_gives_another_pseudonym(site_copy):
    key = bytes.fromhex((site_copy.dir / SECRET_FILE_NAME).read_text().strip())
    other_key = hashlib.sha256(key).digest()
    for case in site_copy.truth:
        mrn = case.patient.mrn
        assert Pseudonymiser(key)(mrn) != Pseudonymiser(other_key)(mrn)
    # Re-keying the whole site changes every pseudonym it hands out.
    (site_copy.dir / SECRET_FILE_NAME).write_text(other_key.hex() + "\n")
    rekeyed = {c.pseudonym for c in ingest_site(site_copy.dir).cases}
    assert rekeyed.isdisjoint({Pseudonymiser(key)(c.patient.mrn) for c in site_copy.truth})
    assert rekeyed == {Pseudonymiser(other_key)(site_copy.truth[i].patient.mrn)
                       for i in active_indices(site_copy.truth)}


def test_leak_scan_finds_each_kind_of_identifier_where_it_is_planted(site_copy, tmp_path):
    """The opponent for the scans below: an MRN in a log, a FHIR logical id in a report, a
    birth date and a name in a zipped log, a study UID in a binary file are all found."""
    import zipfile

    from phi_scan import fhir_logical_ids, leaks_in_text, leaks_in_tree

    patient = site_copy.truth[0].patient
    identifiers = identifiers_in_input(site_copy.dir)
    logical = sorted(v for v in fhir_logical_ids(site_copy.dir) if v.startswith("Patient/"))[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text(f"2026-01-01 INFO ingested {patient.mrn} fine\n")
    (out / "report.json").write_text(json.dumps({"issue": f"fhir/Patient.ndjson:3 ({logical}): bad"}))
    with zipfile.ZipFile(out / "workspace", "w") as archive:
        archive.writestr("log.txt", f"born {patient.birth_date.isoformat()}, {patient.family_name}")
    (out / "model.pt").write_bytes(b"\0\1\2" + patient.study_uid.encode() + b"\0")
    found = leaks_in_tree(identifiers, out)
    assert found[str(out / "log.txt")] == {patient.mrn}
    assert logical in found[str(out / "report.json")]
    assert found[f"{out / 'workspace'}!log.txt"] >= {patient.birth_date.isoformat(), patient.family_name}
    assert found[str(out / "model.pt")] == {patient.study_uid}
    # A name inside a longer word is not a leak (4-letter names occur in words of any log).
    assert leaks_in_text({"Anna"}, "Annabel Annals") == set() and leaks_in_text({"Anna"}, "to Anna.") == {"Anna"}


def test_data_check_output_carries_no_identifier_of_a_damaged_site(site_copy, capsys):
    """``clinfed data check`` on a site with a broken Patient: the FHIR issues name file and line,
    never the record's logical id (``Patient/<uuid>`` is the hospital's own identifier)."""
    from phi_scan import leaks_in_text

    from clinfed.cli import main

    patient_file = site_copy.dir / "fhir" / "Patient.ndjson"
    mrn = site_copy.truth[active_indices(site_copy.truth)[0]].patient.mrn
    patient_file.write_text(patient_file.read_text(encoding="utf-8").replace(
        f'"value":"{mrn}"', f'"value":{mrn}'), encoding="utf-8")
    identifiers = identifiers_in_input(site_copy.dir)
    for json_flag in ([], ["--json"]):
        assert main(["data", "check", str(site_copy.dir), *json_flag]) == 0
        captured = capsys.readouterr()
        assert "Patient.ndjson" in captured.out  # the issue is reported, by file
        assert leaks_in_text(identifiers, captured.out + captured.err) == set()


def test_full_demo_prints_writes_and_records_no_identifier(tmp_path_factory):
    """``make demo`` of the quick demo as a user runs it (the session's shared run, tests/demo_run.py):
    its output, results, plots, report, FLARE workspace (every participant's logs and run files)
    and ledger hold no identifier of any site's input."""
    from demo_run import shared_demo_run
    from phi_scan import leaks_in_text, leaks_in_tree

    run = shared_demo_run(tmp_path_factory)
    out = run.out
    # The sites' input: their training data and their held-out test patients.
    inputs = (out / "data", out / "test_data")
    sites = sorted(p for folder in inputs for p in folder.iterdir() if p.is_dir())
    identifiers = set().union(*(identifiers_in_input(site) for site in sites))
    assert len(sites) == 6 and len(identifiers) > 300
    assert (out / "results.json").is_file() and (out / "ledger.sqlite").is_file()
    assert leaks_in_text(identifiers, run.stdout + run.stderr) == set()
    assert leaks_in_tree(identifiers, out, skip=inputs) == {}
