"""``report.html``: one self-contained page that loads in headless Chromium with no console error
and fetches nothing, whose every figure is the one in ``results.json``."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest

from browser import browser_errors, chromium
from clinfed.report import REPORT_FILE, pointer, render_report, resolve_pointer

SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def shown_figures(driver) -> list[dict]:
    """Every element of the page that shows a figure of results.json: pointer, exact value, text."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('[data-pointer]'), e => "
        "({pointer: e.dataset.pointer, value: e.dataset.value, text: e.textContent.trim()}));")


def assert_shows(figure: dict, results: dict) -> None:
    """The element's value is the one at its pointer, and its text that value (rounded as shown)."""
    expected = resolve_pointer(results, figure["pointer"])
    assert json.loads(figure["value"]) == expected, figure
    text = figure["text"]
    if isinstance(expected, bool):
        assert text == ("VERIFIED" if expected else "NOT VERIFIED"), figure
    elif isinstance(expected, float):
        digits = len(text.split(".")[1]) if "." in text else 0
        assert math.isclose(float(text), expected, abs_tol=0.5 * 10 ** -digits + 1e-12), figure
    elif expected is None:
        assert text == "n/a", figure
    elif isinstance(expected, list):
        assert text == ", ".join(map(str, expected)), figure
    else:
        assert text == str(expected), figure


def load(driver, path):
    driver.get(path.as_uri())
    return browser_errors(driver)


def test_report_loads_with_no_console_error_and_fetches_nothing(demo_run, browser):
    report = demo_run.out / REPORT_FILE
    assert load(browser, report) == []
    html = report.read_text()
    assert "<script" not in html
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", html), "the page refers to something outside itself"
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert all(name.startswith("data:") for name in resources), resources
    images = browser.execute_script(
        "return Array.from(document.images, i => ({id: i.id, width: i.naturalWidth, src: i.src.slice(0, 22)}));")
    assert {i["id"] for i in images} == {"final-scores", "dice-per-round"}
    assert all(i["width"] > 300 and i["src"] == "data:image/png;base64," for i in images), images


def test_report_figures_are_those_of_results_json(demo_run, browser):
    results = demo_run.results
    assert load(browser, demo_run.out / REPORT_FILE) == []
    figures = shown_figures(browser)
    for figure in figures:
        assert_shows(figure, results)
    shown = {f["pointer"] for f in figures}
    # What the page must show, each from results.json: the configuration, the ingestion summary,
    # every arm's Dice and AUC, Dice per round and per site, the ledger's verification.
    expected = {pointer("config", key) for key in results["config"]}
    expected |= {pointer("ingestion", site, field) for site in SITES for field in ("usable", "excluded")}
    # Each arm on all test sets: Dice and the three outcome AUCs, each a mean and its interval.
    expected |= {pointer(*arm, metric, *part) for arm in [("central",), ("federated",), *(("local", s) for s in SITES)]
                 for metric in ("dice", "auc", "auc_ehr_zeroed", "auc_image_zeroed")
                 for part in [("mean",), ("ci95", 0), ("ci95", 1)]}
    # The site x arm table, the paired differences, the comparison rule and each site's profile.
    expected |= {pointer("site_arm", "arms", arm, site, "dice", *part) for arm in results["site_arm"]["arms"]
                 for site in SITES for part in [("mean",), ("ci95", 0), ("ci95", 1)]}
    expected |= {pointer("federated_minus_local", site, where, *part) for site in SITES
                 for where in ("union", "own_site", "other_sites") for part in [("mean",), ("ci95", 0), ("ci95", 1)]}
    expected |= {pointer("comparison", key) for key in ("rule", "epochs_per_arm", "test_sets", "intervals")}
    expected |= {pointer("comparison", "test_patients", site) for site in SITES}
    expected |= {pointer("site_profiles", site, key) for site in SITES
                 for key in ("modality", "tissue", "lesion", "noise_std", "blur_mm", "protocol")}
    for i, entry in enumerate(results["federated"]["per_round"]):
        expected |= {pointer("federated", "per_round", i, key) for key in ("round", "dice", "auc", "seconds")}
        expected |= {pointer("federated", "per_round", i, "site_dice", site) for site in entry["site_dice"]}
    expected |= {pointer("ledger", key) for key in ("job_id", "records", "consents", "rounds", "model_sha256",
                                                     "verified", "model_round", "path")}
    expected |= {pointer("privacy", "mode")}
    assert expected <= shown, sorted(expected - shown)
    assert results["ledger"]["verified"] is True
    assert browser.find_element("css selector", "#no-spend").is_displayed()  # a non-private run spends nothing


def test_report_shows_the_site_by_arm_table_and_spend_per_site_per_round(demo_run, browser, tmp_path):
    """The run's site x arm table as a table a person reads, and, for the same results with DP
    spend per unit, site and round, the spend tables."""
    results = copy.deepcopy(demo_run.results)
    rounds = len(results["federated"]["per_round"])
    results["privacy"].update({
        "mode": "dp+mask", "target_epsilon": 8.0, "masked": True,
        "patient_level": {"epsilon": {s: 3.0 + i for i, s in enumerate(SITES)}, "delta": 1e-5},
        "site_level": {"epsilon": {s: 0.5 for s in SITES}, "delta": 1e-6},
        "per_round": [{"round": r + 1, "patient_epsilon": {s: (3.0 + i) * (r + 1) / rounds for i, s in enumerate(SITES)},
                       "patient_delta": 1e-5, "site_epsilon": {s: 0.5 * (r + 1) / rounds for s in SITES},
                       "site_delta": 1e-6} for r in range(rounds)]})
    page = tmp_path / REPORT_FILE
    page.write_text(render_report(results, {"dice_per_round": b"", "final_scores": b""}))
    driver = browser
    driver.get(page.as_uri())
    figures = shown_figures(driver)
    for figure in figures:
        assert_shows(figure, results)
    shown = {f["pointer"] for f in figures}
    rows = driver.find_element("id", "site-arm-table").find_elements("css selector", "tr")
    assert len(rows) == 1 + 2 + len(SITES)  # header, central, federated, each local-only
    federated = results["site_arm"]["arms"]["federated"]["site-1"]["dice"]
    cell = f"{federated['mean']:.3f} [{federated['ci95'][0]:.3f}, {federated['ci95'][1]:.3f}]"
    assert cell in driver.find_element("id", "site-arm-table").text
    for unit in ("patient", "site"):
        table = driver.find_element("id", f"spend-{unit}")
        assert len(table.find_elements("css selector", "tr")) == 1 + rounds + 1  # header, rounds, total
        assert {pointer("privacy", "per_round", r, f"{unit}_epsilon", s) for r in range(rounds) for s in SITES} <= shown
    assert not driver.find_elements("id", "no-spend")
