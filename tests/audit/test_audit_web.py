"""``clinfed audit serve``: the site operator's read-only web view over the ledger of a demo run,
read in headless Chromium with the site's own identity (its site configuration)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from audit_helpers import revoke_in_fhir_export
from browser import browser_errors, chromium
from clinfed import audit
from clinfed.data.profiles import STUDY_ID
from clinfed.ledger import LocalLedger
from clinfed.ledger.settings import site_config_ledger
from demo_run import clean_environment, clinfed_command, shared_demo_run

SITE = "site-1"
OTHER_SITES = ["site-2", "site-3"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The session's quick ``make demo`` run (tests/demo_run.py), shared with tests/demo."""
    return shared_demo_run(tmp_path_factory)


class Server:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url

    def get(self, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.url.rstrip("/") + path, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode("utf-8")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode("utf-8")


def start_server(*args: str) -> Server:
    proc = subprocess.Popen([clinfed_command(), "audit", "serve", "--port", "0", *args], env=clean_environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"(http://\S+/)", line)
    if not match:
        proc.kill()
        raise AssertionError(f"no URL from audit serve: {line!r} {proc.stderr.read()[-2000:]}")
    return Server(proc, match.group(1))


@pytest.fixture(scope="module")
def server(demo_run):
    served = start_server("--site-config", str(demo_run.site_config(SITE)))
    yield served
    served.proc.terminate()
    served.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def as_site(demo_run, site: str) -> LocalLedger:
    """The ledger as ``site`` reads it, with the identity its site configuration names."""
    return site_config_ledger(site, demo_run.site_config(site)).open(outbox=False)


def open_page(browser, server, path: str) -> None:
    browser.get(server.url.rstrip("/") + path)
    browser.find_element("id", "content")
    assert browser_errors(browser) == []


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words))
    return found


def test_serve_listens_on_loopback_only_by_default(server):
    assert server.url.startswith("http://127.0.0.1:")
    port = int(server.url.rsplit(":", 1)[1].strip("/"))
    assert listening_addresses(port) == {"127.0.0.1"}


def test_jobs_view_lists_the_demo_job_as_verified(demo_run, server, browser):
    job_id = demo_run.results["ledger"]["job_id"]
    open_page(browser, server, "/")
    row = browser.find_element("css selector", f"#jobs tr[data-job='{job_id}']")
    cells = [c.text for c in row.find_elements("css selector", "td")]
    with as_site(demo_run, SITE) as ledger:
        verification = audit.verify(ledger, job_id).job
    assert cells == [job_id, str(verification.rounds), str(verification.records), "VERIFIED"]
    assert SITE in browser.find_element("id", "identity").text


def test_job_view_shows_each_rounds_model_hash_participants_and_absences(demo_run, server, browser):
    job_id = demo_run.results["ledger"]["job_id"]
    open_page(browser, server, f"/jobs/{job_id}")
    with as_site(demo_run, SITE) as ledger:
        rounds = audit.models(ledger, job_id)
    assert len(rounds) == demo_run.results["config"]["rounds"]
    shown = browser.find_elements("css selector", "#rounds tr[data-round]")
    assert len(shown) == len(rounds)
    for row, record in zip(shown, rounds):
        assert row.find_element("css selector", ".model-hash").text == record["model_sha256"]
        assert row.find_element("css selector", ".participants").text == ", ".join(record["participants"])
        absent = "; ".join(f"{a['site']} ({a['reason']})" if a.get("reason") else a["site"] for a in record["absent"])
        assert row.find_element("css selector", ".absent").text == (absent or "-")
    assert browser.find_element("id", "job-verdict").text == "VERIFIED"
    assert rounds[-1]["model_sha256"] == demo_run.results["ledger"]["model_sha256"]


def test_contributions_view_shows_this_sites_updates_with_spend_per_unit(demo_run, server, browser):
    open_page(browser, server, "/contributions")
    with as_site(demo_run, SITE) as ledger:
        records = ledger.contributions_by_site(SITE)
    rows = browser.find_elements("css selector", "#contributions tr")[1:]
    assert len(rows) == len(records) == demo_run.results["config"]["rounds"]
    for row, record in zip(rows, records):
        assert row.find_element("css selector", ".update-hash").text == record.update_sha256
        # The demo's run is not private: neither unit was spent, and neither is shown as spent.
        assert record.patient_epsilon is None and record.site_epsilon is None
        assert row.find_element("css selector", ".patient-epsilon").text == "-"
        assert row.find_element("css selector", ".site-epsilon").text == "-"
    header = browser.find_element("css selector", "#contributions tr").text
    assert "patient_epsilon" in header and "site_epsilon" in header


def other_sites_pseudonyms(demo_run) -> set[str]:
    """Every pseudonym another site published, as that site itself reads them."""
    found = set()
    for site in OTHER_SITES:
        with as_site(demo_run, site) as ledger:
            found |= {c.pseudonym for c in ledger.consents(STUDY_ID, site=site)}
    return found


def test_consents_view_shows_counts_and_only_this_sites_pseudonyms(demo_run, server, browser):
    open_page(browser, server, "/consents")
    with as_site(demo_run, SITE) as ledger:
        counts = audit.consent_counts(ledger, STUDY_ID)
        own = audit.consents(ledger, STUDY_ID, site=SITE)
    for site, count in counts.items():
        row = browser.find_element("css selector", f"#consent-counts tr[data-site='{site}']")
        assert row.find_element("css selector", ".active").text == str(count.get("active", 0))
        assert row.find_element("css selector", ".revoked").text == str(count.get("revoked", 0))
    shown = [e.text for e in browser.find_elements("css selector", "#own-consents .pseudonym")]
    assert sorted(shown) == sorted(c["pseudonym"] for c in own) and shown
    others = other_sites_pseudonyms(demo_run)
    assert others and not {p for p in others if p in browser.page_source}


def test_a_dropped_model_file_is_verified_and_a_tampered_one_is_not(demo_run, server, browser, tmp_path):
    job_id = demo_run.results["ledger"]["job_id"]
    model = demo_run.model_file
    tampered = tmp_path / "FL_global_model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    open_page(browser, server, f"/jobs/{job_id}")
    final_round = demo_run.results["ledger"]["model_round"]
    for path, verdict in ((model, "VERIFIED"), (tampered, "NOT VERIFIED")):
        browser.execute_script("document.getElementById('verify-result').replaceChildren();"
                               "document.getElementById('model-file').value = '';")
        browser.find_element("id", "model-file").send_keys(str(path))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            shown = browser.execute_script("const v = document.getElementById('verify-verdict');"
                                           "return v ? v.textContent : null;")
            if shown in ("VERIFIED", "NOT VERIFIED"):
                break
            time.sleep(0.2)
        assert shown == verdict
        detail = browser.find_element("id", "verify-result").text
        if verdict == "VERIFIED":
            assert f"recorded as the global model of round {final_round} of job {job_id}" in detail
        else:
            assert "not recorded for any round" in detail
    assert browser_errors(browser) == []


def test_the_page_updates_live_when_the_site_revokes_a_consent(demo_run, server, browser):
    """A patient of site-1 opts out while the page is open: the site's operator publishes it
    (``clinfed consent sync``), and the page shows the new counts without being reloaded. The
    event stream meanwhile says only what kind of record changed."""
    open_page(browser, server, "/consents")
    browser.execute_script("window.loadedOnce = true;")
    before = int(browser.find_element("css selector", f"#consent-counts tr[data-site='{SITE}'] .revoked").text)
    with as_site(demo_run, SITE) as ledger:
        victim = next(c["pseudonym"] for c in audit.consents(ledger, STUDY_ID, site=SITE) if c["status"] == "active")

    stream: list[str] = []
    def read_events():
        with urllib.request.urlopen(server.url + "events", timeout=60) as response:
            for raw in response:
                stream.append(raw.decode("utf-8"))
                if raw.startswith(b"data:") and b"ConsentRecorded" in raw:
                    return
    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    time.sleep(1)

    site_dir = demo_run.out / "data" / SITE
    revoke_in_fhir_export(site_dir, victim)
    sync = subprocess.run([clinfed_command(), "consent", "sync", str(site_dir), "--site", SITE,
                           "--site-config", str(demo_run.site_config(SITE))], env=clean_environment(),
                          capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cell = browser.find_element("css selector", f"#consent-counts tr[data-site='{SITE}'] .revoked").text
        if cell == str(before + 1):
            break
        time.sleep(0.3)
    assert cell == str(before + 1)
    status = [e.text for e in browser.find_elements("css selector", "#own-consents tr")
              if victim in e.text]
    assert status and "revoked" in status[0]
    assert browser.execute_script("return window.loadedOnce === true && document.body.dataset.refreshed >= 1;")
    assert browser_errors(browser) == []
    reader.join(30)
    messages = [json.loads(line[5:]) for line in stream if line.startswith("data:")]
    assert messages and all(set(m) <= {"event", "block", "job_id", "study"} for m in messages), messages
    assert victim not in "".join(stream)


def test_the_view_has_no_write_path_and_reading_writes_nothing(demo_run, server):
    job_id = demo_run.results["ledger"]["job_id"]
    with as_site(demo_run, SITE) as ledger:
        height = ledger.height()
    paths = ["/", f"/jobs/{job_id}", "/contributions", "/consents", f"/api/verify?job={job_id}&sha256={'0' * 64}"]
    for path in paths:
        assert server.get(path)[0] == 200, path
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            assert server.get(path, method=method)[0] == 405, (method, path)
    with as_site(demo_run, SITE) as ledger:
        assert ledger.height() == height


def test_a_request_for_another_host_is_refused(server):
    """A web page elsewhere cannot read the view through a name it points at 127.0.0.1."""
    port = server.url.rsplit(":", 1)[1].strip("/")
    status, body = server.get("/consents", headers={"Host": f"attacker.example:{port}"})
    assert status == 421 and "pseudonym" not in body


def test_serve_refuses_to_read_as_another_site_with_this_sites_configuration(demo_run):
    proc = subprocess.run([clinfed_command(), "audit", "serve", "--port", "0", "--site-config",
                           str(demo_run.site_config(SITE)), "--as", "site-2"], env=clean_environment(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "holds the ledger identity of site-1, not of site-2" in proc.stderr


def test_serve_refuses_a_ledger_that_fails_verification(demo_run, tmp_path):
    """A copy of the demo's ledger with one consent record's block edited: the view does not start
    on it and names the block (the ledger checks its chain when opened)."""
    import sqlite3

    copy = tmp_path / "ledger.sqlite"
    shutil.copy(demo_run.ledger_path, copy)
    shutil.copytree(demo_run.ledger_path.with_name("ledger.sqlite.identities"),
                    tmp_path / "ledger.sqlite.identities")
    with sqlite3.connect(copy) as db:
        number, header = db.execute("SELECT number, header FROM blocks WHERE number = 3").fetchone()
        db.execute("UPDATE blocks SET header = ? WHERE number = ?", (header.replace(b'"number"', b'"Number"'), number))
    proc = subprocess.run([clinfed_command(), "audit", "serve", "--port", "0", "--ledger", str(copy), "--as", SITE],
                          env=clean_environment(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "block 3 fails verification" in proc.stderr and "http://" not in proc.stdout
