"""The protocol without FLARE: exact sums, dropouts, the checks a site makes, update-level DP."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from clinfed.privacy import secagg
from clinfed.privacy.accounting import compose_epsilon
from clinfed.privacy.errors import SecAggRefused

SITES = [f"site-{i}" for i in range(1, 6)]
SIZE = 20_000


@pytest.fixture(scope="module")
def keys():
    return {site: X25519PrivateKey.generate() for site in SITES}


@pytest.fixture(scope="module")
def registry(keys):
    return secagg.SiteRegistry("CoordinatorMSP", {s: (f"Site{s[-1]}MSP", secagg.public_key_bytes(keys[s])) for s in SITES})


def _context(encoding=None, participants=SITES, threshold=3, round_=0):
    return secagg.RoundContext("job-1", round_, tuple(participants), threshold,
                               encoding or secagg.Encoding("exact", 0.5, 200.0))


def _updates(seed=0):
    rng = np.random.default_rng(seed)
    return {s: rng.normal(0, 0.01, SIZE) for s in SITES}, {s: float(10 + i) for i, s in enumerate(SITES)}


def _round(context, keys, registry, dropped=(), policy=secagg.SecAggPolicy()):
    updates, weights = _updates()
    server = secagg.ServerRound(context)
    states = {}
    for site in context.participants:
        secagg.check_context(context, site=site, job_id="job-1", registry=registry, policy=policy)
        states[site], message = secagg.setup(context, site=site, long_term=keys[site], registry=registry)
        server.accept_setup(site, message)
    relay = server.relay()
    survivors = [s for s in context.participants if s not in dropped]
    total = np.zeros(SIZE, np.uint32)
    inputs = {}
    for site in context.participants:
        secagg.receive_shares(states[site], share_senders=server.share_senders, ciphertexts=relay[site],
                              long_term=keys[site], registry=registry, policy=policy)
        inputs[site] = secagg.mask(states[site], secagg.encode({"w": updates[site]}, [("w", (SIZE,))], weights[site], context).ring)
        if site in survivors:
            total += inputs[site]
    answers = {s: secagg.unmask_answer(states[s], survivors, policy) for s in survivors}
    mean = secagg.decode_sum(server.unmask(total, survivors, answers), sum(weights[s] for s in survivors), context)
    expected = sum(weights[s] * updates[s] for s in survivors) / sum(weights[s] for s in survivors)
    return mean, expected, inputs, states, updates


@pytest.mark.parametrize("dropped", [(), ("site-2",), ("site-2", "site-5")])
def test_the_survivors_weighted_mean_comes_out_exactly(keys, registry, dropped):
    mean, expected, *_ = _round(_context(), keys, registry, dropped)
    assert np.linalg.norm(mean - expected) / np.linalg.norm(expected) < 1e-6


def test_a_masked_input_alone_tells_nothing_of_its_update(keys, registry):
    _, _, inputs, _, updates = _round(_context(), keys, registry)
    for site, ring in inputs.items():
        signed = ring.view(np.int32).astype(np.float64)
        assert abs(np.corrcoef(signed, updates[site])[0, 1]) < 0.05


def test_more_dropouts_than_the_threshold_cannot_be_opened(keys, registry):
    with pytest.raises(SecAggRefused, match="the survivor list has 2 sites, fewer than this site's minimum of 3"):
        _round(_context(), keys, registry, dropped=("site-1", "site-2", "site-3"))


@pytest.mark.parametrize("participants, threshold, reason", [
    ([*SITES, "site-9"], 3, "'site-9' is not a registered site of the consortium"),
    (SITES[:2], 2, "the participant list has 2 sites, fewer than this site's minimum of 3"),
    (SITES, 2, "threshold 2 of 5 is below this site's minimum 3"),
    (SITES[1:], 3, "this site is not in the participant list"),
])
def test_a_site_refuses_a_list_it_cannot_trust(registry, participants, threshold, reason):
    with pytest.raises(SecAggRefused, match=reason):
        secagg.check_context(_context(participants=participants, threshold=threshold), site="site-1",
                             job_id="job-1", registry=registry, policy=secagg.SecAggPolicy())


def test_one_organisation_and_the_coordinators_names_are_refused(keys):
    shared = {s: (f"Site{s[-1]}MSP", secagg.public_key_bytes(keys[s])) for s in SITES}
    for owner, reason in (("Site1MSP", "'site-1' and 'site-9' belong to one organisation Site1MSP"),
                          ("CoordinatorMSP", "'site-9' belongs to the coordinator's organisation")):
        registry = secagg.SiteRegistry("CoordinatorMSP", {**shared, "site-9": (owner, b"\0" * 32)})
        with pytest.raises(SecAggRefused, match=reason):
            secagg.check_context(_context(participants=[*SITES, "site-9"]), site="site-1", job_id="job-1",
                                 registry=registry, policy=secagg.SecAggPolicy())


def _set_up_all(context, keys, registry):
    server = secagg.ServerRound(context)
    states = {}
    for site in context.participants:
        states[site], message = secagg.setup(context, site=site, long_term=keys[site], registry=registry)
        server.accept_setup(site, message)
    return server, states


def test_a_list_may_only_shrink_and_each_site_answers_once(keys, registry):
    context = _context()
    server, states = _set_up_all(context, keys, registry)
    relay = server.relay()
    policy = secagg.SecAggPolicy()
    with pytest.raises(SecAggRefused, match=r"adds \['site-9'\]"):
        secagg.receive_shares(states["site-1"], share_senders=[*SITES, "site-9"], ciphertexts=relay["site-1"],
                              long_term=keys["site-1"], registry=registry, policy=policy)
    secagg.receive_shares(states["site-1"], share_senders=SITES, ciphertexts=relay["site-1"],
                          long_term=keys["site-1"], registry=registry, policy=policy)
    secagg.mask(states["site-1"], np.zeros(SIZE, np.uint32))
    with pytest.raises(SecAggRefused, match="already masked"):
        secagg.mask(states["site-1"], np.zeros(SIZE, np.uint32))
    secagg.unmask_answer(states["site-1"], SITES[:4], policy)
    with pytest.raises(SecAggRefused, match="already answered an unmask request"):
        secagg.unmask_answer(states["site-1"], SITES, policy)


def test_a_relayed_share_not_made_with_the_registered_key_fails_authentication(keys, registry):
    context = _context()
    server, states = _set_up_all(context, keys, registry)
    impostor = X25519PrivateKey.generate()
    forged_registry = secagg.SiteRegistry("CoordinatorMSP", {**registry.sites,
                                                             "site-2": ("Site2MSP", secagg.public_key_bytes(impostor))})
    _, forged = secagg.setup(context, site="site-2", long_term=impostor, registry=forged_registry)
    server.setups["site-2"] = forged
    with pytest.raises(SecAggRefused, match="the shares relayed as 'site-2''s fail authentication"):
        secagg.receive_shares(states["site-1"], share_senders=SITES, ciphertexts=server.relay()["site-1"],
                              long_term=keys["site-1"], registry=registry, policy=secagg.SecAggPolicy())


def test_dp_encoding_carries_the_noise_the_sites_shares_add_up_to(keys, registry):
    sigma, clip = 0.5, 1.0
    context = _context(secagg.Encoding("dp", clip, 200.0, sigma))
    mean, expected, *_ = _round(context, keys, registry)
    # Noise on the weighted mean: sigma * C * W / sum(w) per coordinate (W = 200, sum w = 60), at
    # least (t = 3 shares of variance 1/3 each; here all 5 sites add theirs).
    noise = mean - expected
    floor = sigma * clip * 200.0 / 60.0
    assert floor <= noise.std() <= floor * np.sqrt(5 / 3) * 1.05
    assert abs(noise.mean()) < 5 * noise.std() / np.sqrt(SIZE)


def test_skellam_accounting_is_a_gaussian_bound_at_integer_orders():
    context = _context(secagg.Encoding("dp", 1.0, 200.0, 1.0))
    sigma = secagg.skellam_noise_multiplier(context, 4_700_000)
    assert 0.99 < sigma < 1.0  # rounding and the discretisation surcharge cost under 1% (d = 4.7M)
    gaussian_rdp = compose_epsilon([(1.0, 1.0, 10)], 1e-5, "rdp")
    skellam = compose_epsilon([(sigma, 1.0, 10)], 1e-5, "skellam")
    assert gaussian_rdp < skellam < gaussian_rdp * 1.1
