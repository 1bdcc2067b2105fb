"""Queries an auditor can afford: bounded pages, bookmarks that stay inside their query, index
lookups by site and pseudonym, on every backend."""

from __future__ import annotations

import json

import pytest

from clinfed.ledger import Contribution, InvalidRecord
from clinfed_chaincode.contract import MAX_PAGE_SIZE
from ledger_helpers import digest

JOB = "job-pages"


def _record(consortium, site: str, round_: int, job: str = JOB):
    consortium.site(site).record_contribution(Contribution(job, round_, site, digest(f"{job}/{round_}/{site}"), 3))


def test_pages_are_bounded_and_follow_bookmarks_in_order(consortium):
    for round_ in range(7):
        _record(consortium, "site-1", round_)
    reader = consortium.coordinator
    first = json.loads(reader.evaluate("GetContributions", JOB, "3", ""))
    assert [r["round"] for r in first["records"]] == [0, 1, 2] and first["bookmark"]
    second = json.loads(reader.evaluate("GetContributions", JOB, "3", first["bookmark"]))
    assert [r["round"] for r in second["records"]] == [3, 4, 5]
    last = json.loads(reader.evaluate("GetContributions", JOB, "3", second["bookmark"]))
    assert [r["round"] for r in last["records"]] == [6] and last["bookmark"] == ""
    assert [c.round for c in reader.iter_contributions(JOB)] == list(range(7))


@pytest.mark.parametrize("size", ["0", str(MAX_PAGE_SIZE + 1), "ten"])
def test_page_size_is_bounded(consortium, size):
    with pytest.raises(InvalidRecord, match=f"page_size must be an integer from 1 to {MAX_PAGE_SIZE}"):
        consortium.coordinator.evaluate("GetContributions", JOB, size, "")


def test_a_bookmark_cannot_reach_outside_its_query(consortium):
    _record(consortium, "site-1", 0, job="job-a")
    _record(consortium, "site-1", 0, job="job-b")
    _record(consortium, "site-1", 1, job="job-b")
    reader = consortium.coordinator
    other = json.loads(reader.evaluate("GetContributions", "job-b", "1", ""))["bookmark"]
    with pytest.raises(InvalidRecord, match="bookmark does not belong to this query"):
        reader.evaluate("GetContributions", "job-a", "1", other)


def test_by_site_lookup_goes_through_the_index(consortium):
    for job in ("job-x", "job-y"):
        for site in ("site-1", "site-2"):
            _record(consortium, site, 0, job=job)
    found = consortium.site("site-3").contributions_by_site("site-2")
    assert [(c.job_id, c.site) for c in found] == [("job-x", "site-2"), ("job-y", "site-2")]
