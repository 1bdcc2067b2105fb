"""A coordinator that cheats, in real FLARE simulator runs: each time it ends up with no single
site's update (nothing it holds correlates with the target's update beyond 0.01), and the honest
sites refuse, naming the reason.

The updates are 500,000 random values per site, independent across sites, so the correlation of
an unrelated vector with the target's update is about 0.0014 (1/sqrt(n)): 0.01 is seven of those.
"""

from __future__ import annotations

import numpy as np
import pytest
from cheating_coordinator import CheatingCoordinator
from secagg_helpers import Consortium, logs, site_names
from secagg_parts import ScriptedTrainer, scripted_update, weighted_mean

from clinfed.ledger import LedgerRejected, LocalLedger
from clinfed.ledger.pki import create_simulation_identities, simulation_identity_files, simulation_membership
from clinfed.ledger.settings import COORDINATOR, COORDINATOR_MSP, ledger_settings, msp_id_for

SIZE = 500_000
TARGET = "site-1"
pytestmark = pytest.mark.timeout(300)


def _cheat(consortium: Consortium, cheat: str, rounds: int = 1, trainers: dict | None = None, **kwargs):
    workflow = CheatingCoordinator(cheat=cheat, target=TARGET, ledger=str(consortium.ledger),
                                   num_clients=len(consortium.sites), num_rounds=rounds, persistor_id="",
                                   model={"w": [0.0] * SIZE}, weight_bound=500.0, setup_timeout=30,
                                   train_timeout=kwargs.pop("train_timeout", 30), unmask_timeout=30, **kwargs)
    workspace = consortium.run(workflow=workflow, trainers=trainers, rounds=rounds, name=cheat)
    held_files = list(workspace.rglob("held.npz"))
    assert len(held_files) == 1, "the cheating coordinator did not report what it holds"
    return workspace, dict(np.load(held_files[0]))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return 0.0 if denominator == 0 else float(a @ b / denominator)


def _assert_holds_nothing_of_the_target(held: dict, round_: int, sites: list[str]) -> None:
    target = scripted_update(TARGET, round_, "w", SIZE).astype(np.float64)
    # The yardstick has teeth: what an honest round publishes (the average of all sites) carries
    # the target's update well above the bound.
    assert abs(_correlation(weighted_mean(sites, round_, size=SIZE), target)) > 0.1
    for name, vector in held.items():
        assert abs(_correlation(vector, target)) < 0.01, f"{name} reveals {TARGET}'s update"


def _refusal(workspace, site: str) -> str:
    return "\n".join(line for line in logs(workspace, site).splitlines() if "refused: " in line)


def test_a_fake_site_in_the_list_is_refused(tmp_path):
    consortium = Consortium(tmp_path, site_names(4))
    workspace, held = _cheat(consortium, "fake_site")
    assert not held
    for site in consortium.sites:
        assert "'site-evil' is not a registered site of the consortium" in _refusal(workspace, site)


@pytest.mark.parametrize("owner, contract_reason", [
    ("Site1MSP", "each site needs an MSP ID of its own"),
    (COORDINATOR_MSP, "the coordinator's MSP CoordinatorMSP cannot also be a site's"),
])
def test_two_names_of_one_organisation_or_a_coordinator_owned_name_are_refused(tmp_path, owner, contract_reason):
    """The coordinator first tries to record the consortium with an extra name, site-9, owned by
    site-1's organisation or by itself: the contract refuses. It then lists site-9 anyway: every
    site refuses a name its pinned registry does not hold. (Each site also checks organisations
    itself, for a registry that did hold such a name: tests/secagg/test_secagg_protocol.py.)"""
    sites = site_names(4)
    ledger = tmp_path / "ledger.sqlite"
    participants = {COORDINATOR: COORDINATOR_MSP, **{s: msp_id_for(s) for s in sites}}
    create_simulation_identities(ledger, participants)
    coordinator_files = simulation_identity_files(ledger, COORDINATOR)
    LocalLedger.create(ledger, coordinator_files.load(COORDINATOR_MSP), simulation_membership(ledger),
                       head_file=coordinator_files.head_file).close()
    with LocalLedger(ledger, COORDINATOR_MSP) as coordinator, pytest.raises(LedgerRejected, match=contract_reason):
        coordinator.init_consortium({**{s: msp_id_for(s) for s in sites}, "site-9": owner}, COORDINATOR_MSP)
    consortium = Consortium(tmp_path, sites)
    workspace, held = _cheat(consortium, "listed_names", names=[*sites, "site-9"])
    assert not held
    for site in sites:
        assert "'site-9' is not a registered site of the consortium" in _refusal(workspace, site)


def test_a_list_shorter_than_the_sites_minimum_is_refused(tmp_path):
    consortium = Consortium(tmp_path, site_names(4))
    workspace, held = _cheat(consortium, "listed_names", names=["site-1", "site-2"])
    assert not held
    for site in ("site-1", "site-2"):
        assert "the participant list has 2 sites, fewer than this site's minimum of 3" in _refusal(workspace, site)


def test_a_dropout_claimed_after_every_input_arrived_leaves_the_target_masked(tmp_path):
    consortium = Consortium(tmp_path, site_names(5))
    workspace, held = _cheat(consortium, "claim_dropout")
    assert {f"masked_input_{s}" for s in consortium.sites} <= set(held)
    assert "target_without_pairwise_masks" in held  # it did strip the pairwise masks...
    _assert_holds_nothing_of_the_target(held, 0, consortium.sites)  # ...the self-mask still hides it
    for site in consortium.sites[1:]:
        assert "already answered an unmask request for round 0" in _refusal(workspace, site)


def test_a_late_input_kept_after_recovery_stays_masked(tmp_path):
    consortium = Consortium(tmp_path, site_names(5))
    workspace, held = _cheat(consortium, "keep_late", trainers={TARGET: ScriptedTrainer(delay_seconds=8)})
    assert f"masked_input_{TARGET}" in held, "the late input never reached the coordinator"
    assert "target_without_pairwise_masks" in held
    _assert_holds_nothing_of_the_target(held, 0, consortium.sites)
    for site in consortium.sites[1:]:
        assert "already answered an unmask request for round 0" in _refusal(workspace, site)


def test_a_key_swapped_mid_job_is_refused(tmp_path):
    consortium = Consortium(tmp_path, site_names(4))
    workspace, held = _cheat(consortium, "swap_key", rounds=2)
    _assert_holds_nothing_of_the_target(held, 1, consortium.sites)
    for site in consortium.sites[1:]:
        assert ("the shares relayed as 'site-1''s fail authentication: altered, or not made with 'site-1''s "
                "registered key for this round") in _refusal(workspace, site)
    # The new key is on the ledger, and applies only from the next job on.
    with ledger_settings("site-2", ledger=consortium.ledger).open(outbox=False) as ledger:
        assert ledger.site_keys()[TARGET].version == 2
