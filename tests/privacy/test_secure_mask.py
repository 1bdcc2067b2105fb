"""Secure masking: exact weighted FedAvg from masked updates, nothing of one site, clean dropout."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FilterKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from privacy_helpers import SITE_SAMPLES, SITES, make_fl_ctx

from clinfed.aggregators.fedavg import WeightedFedAvg
from clinfed.aggregators.masked_sum import MaskedSumAggregator
from clinfed.filters.secure_mask import MASKED_DATA_KIND, SecureMaskFilter
from clinfed.privacy.errors import KeyDirectoryError, MaskedRoundIncomplete, MaskingError, MaskRangeExceeded
from clinfed.privacy.masking import (
    MASK_CONTEXT_KEY,
    MASKED_META_KEY,
    FileSiteKeyDirectory,
    MaskContext,
    generate_private_key_file,
    write_key_directory,
)

JOB = "job-1"


def context(participants=SITES, round_=3, attempt=0, clip_range=0.5) -> MaskContext:
    return MaskContext(job_id=JOB, round=round_, attempt=attempt, participants=tuple(participants),
                       total_weight=float(sum(SITE_SAMPLES[p] for p in participants)), clip_range=clip_range)


def mask_at_site(site, update, ctx: MaskContext, site_keys, mask_filter=None) -> FLModel:
    """The site's result filter, then what the server's FedAvg hands the aggregator."""
    private, directory = site_keys
    mask_filter = mask_filter or SecureMaskFilter(private_key_file=str(private[site]),
                                                  key_directory_file=str(directory))
    result = DXO(DataKind.WEIGHT_DIFF, data=update,
                 meta={"n_samples": SITE_SAMPLES[site], MASK_CONTEXT_KEY: ctx.to_meta()})
    masked = mask_filter.process(result.to_shareable(), make_fl_ctx(site, JOB))
    model = FLModelUtils.from_shareable(masked)
    model.meta["client_name"] = site
    return model


def plain_fedavg(updates: dict, sites) -> dict:
    plain = WeightedFedAvg()
    for site in sites:
        plain.accept_model(FLModel(params_type=ParamsType.DIFF, params=updates[site],
                                   meta={"site_name": site, "n_samples": SITE_SAMPLES[site]}))
    return plain.aggregate_model().params


def relative_error(a: dict, b: dict) -> float:
    x = np.concatenate([np.asarray(a[k], np.float64).ravel() for k in sorted(b)])
    y = np.concatenate([np.asarray(b[k], np.float64).ravel() for k in sorted(b)])
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def flat(update: dict) -> np.ndarray:
    return np.concatenate([np.asarray(update[k], np.float64).ravel() for k in sorted(update)])


def test_masked_aggregate_equals_weighted_fedavg_on_fusion_updates(fusion_updates, site_keys):
    ctx = context()
    aggregator = MaskedSumAggregator()
    aggregator.expect(ctx)
    for site in SITES:
        model = mask_at_site(site, fusion_updates[site], ctx, site_keys)
        assert all(v.dtype == np.uint32 for v in model.params.values())
        aggregator.accept_model(model)
    result = aggregator.aggregate_model()
    assert result.params_type == ParamsType.DIFF
    assert relative_error(result.params, plain_fedavg(fusion_updates, SITES)) < 1e-6
    assert result.meta["site_samples"] == {s: float(SITE_SAMPLES[s]) for s in SITES}


def test_what_the_server_holds_for_one_site_is_independent_of_its_update(fusion_updates, site_keys):
    ctx = context()
    aggregator = MaskedSumAggregator()
    aggregator.expect(ctx)
    held = mask_at_site("site-1", fusion_updates["site-1"], ctx, site_keys)
    aggregator.accept_model(held)
    update = flat(fusion_updates["site-1"])
    assert update.size > 240_000
    for what_server_has in (flat(held.params), flat(aggregator._sum)):
        assert abs(np.corrcoef(what_server_has, update)[0, 1]) < 0.01
    # Two of three sites summed is still masked by the third's pairwise masks.
    aggregator.accept_model(mask_at_site("site-2", fusion_updates["site-2"], ctx, site_keys))
    two_sites = flat(fusion_updates["site-1"]) * 17 + flat(fusion_updates["site-2"]) * 41
    assert abs(np.corrcoef(flat(aggregator._sum), two_sites)[0, 1]) < 0.01
    # The masked values look uniform on the ring: mean 2^31, no structure left.
    assert flat(held.params).mean() == pytest.approx(2**31, rel=0.01)


def test_missing_participant_refuses_the_aggregate_and_a_redo_without_it_is_exact(fusion_updates, site_keys):
    aggregator = MaskedSumAggregator()
    first = context(attempt=0)
    aggregator.expect(first)
    for site in ("site-1", "site-2"):  # site-3 drops out after the task was sent
        aggregator.accept_model(mask_at_site(site, fusion_updates[site], first, site_keys))
    with pytest.raises(MaskedRoundIncomplete) as refused:
        aggregator.aggregate_model()
    assert refused.value.missing == ["site-3"] and refused.value.received == ["site-1", "site-2"]

    redo = context(participants=refused.value.received, attempt=1)
    aggregator.expect(redo)
    late = mask_at_site("site-3", fusion_updates["site-3"], first, site_keys)
    aggregator.accept_model(late)  # a late answer to the abandoned attempt is refused
    for site in redo.participants:
        aggregator.accept_model(mask_at_site(site, fusion_updates[site], redo, site_keys))
    result = aggregator.aggregate_model()
    assert result.meta["participants"] == ["site-1", "site-2"] and result.meta["mask_attempt"] == 1
    assert relative_error(result.params, plain_fedavg(fusion_updates, ["site-1", "site-2"])) < 1e-6


def test_each_attempt_gets_fresh_masks_and_a_site_never_masks_twice_for_one_attempt(site_keys):
    private, directory = site_keys
    mask_filter = SecureMaskFilter(private_key_file=str(private["site-1"]), key_directory_file=str(directory))
    update = {"w": np.full(1000, 0.01, np.float32)}
    a0 = flat(mask_at_site("site-1", update, context(attempt=0), site_keys, mask_filter).params)
    a1 = flat(mask_at_site("site-1", update, context(attempt=1), site_keys, mask_filter).params)
    # Same update, new masks: the difference of the two is uniform noise, not zero.
    assert np.count_nonzero(a0 == a1) < 5
    with pytest.raises(MaskingError, match="already masked an update for job job-1 round 3 attempt 1"):
        mask_filter.process_dxo(DXO(DataKind.WEIGHT_DIFF, data=update,
                                    meta={"n_samples": 17, MASK_CONTEXT_KEY: context(attempt=1).to_meta()}),
                                DXO(DataKind.WEIGHT_DIFF, data=update).to_shareable(), make_fl_ctx("site-1", JOB))


def test_site_refuses_lists_it_cannot_trust(site_keys, tmp_path):
    private, directory = site_keys
    update = {"w": np.zeros(10, np.float32)}
    strict = SecureMaskFilter(private_key_file=str(private["site-1"]), key_directory_file=str(directory),
                              min_participants=3)
    with pytest.raises(MaskingError, match="fewer than this site's minimum of 3"):
        mask_at_site("site-1", update, context(participants=("site-1", "site-2")), site_keys, strict)
    with pytest.raises(MaskingError, match="not in this round's participant list"):
        mask_at_site("site-1", update, context(participants=("site-2", "site-3")), site_keys)
    # A directory whose entry for this site is someone else's key (a swapped registration).
    other = generate_private_key_file(tmp_path / "other.pem")
    keys = FileSiteKeyDirectory(directory).public_keys()
    write_key_directory(tmp_path / "swapped.json", {**keys, "site-1": other})
    swapped = SecureMaskFilter(private_key_file=str(private["site-1"]),
                               key_directory_file=str(tmp_path / "swapped.json"))
    with pytest.raises(KeyDirectoryError, match="does not match this site's private key"):
        mask_at_site("site-1", update, context(), site_keys, swapped)


def test_mask_context_is_taken_from_the_task_when_the_executor_does_not_copy_it(site_keys):
    private, directory = site_keys
    mask_filter = SecureMaskFilter(private_key_file=str(private["site-2"]), key_directory_file=str(directory))
    task = DXO(DataKind.WEIGHTS, data={"w": np.zeros(4, np.float32)}, meta={MASK_CONTEXT_KEY: context().to_meta()})
    incoming = mask_filter.process(task.to_shareable(), make_fl_ctx("site-2", JOB, FilterKey.IN, task_id="t-9"))
    assert from_shareable(incoming).data_kind == DataKind.WEIGHTS  # on the way in: recorded, not changed
    result = DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(4, np.float32)}, meta={"n_samples": 41})
    masked = mask_filter.process(result.to_shareable(), make_fl_ctx("site-2", JOB, FilterKey.OUT, task_id="t-9"))
    masked_dxo = FLModelUtils.from_shareable(masked)
    assert masked_dxo.meta[MASKED_META_KEY]["context_id"] == context().context_id
    with pytest.raises(MaskingError, match="no 'clinfed_mask_context'"):
        mask_filter.process(result.to_shareable(), make_fl_ctx("site-2", JOB, FilterKey.OUT, task_id="t-other"))


def test_aggregator_accepts_only_masked_updates_of_listed_sites(fusion_updates, site_keys):
    aggregator = MaskedSumAggregator()
    aggregator.expect(context())
    aggregator.accept_model(FLModel(params_type=ParamsType.DIFF, params=fusion_updates["site-1"],
                                    meta={"client_name": "site-1", "n_samples": 17}))
    masked = mask_at_site("site-2", fusion_updates["site-2"], context(), site_keys)
    masked.meta["n_samples"] = 99  # clear weight must be the masked weight
    aggregator.accept_model(masked)
    with pytest.raises(MaskedRoundIncomplete) as refused:
        aggregator.aggregate_model()
    assert refused.value.received == []


def test_weights_over_the_fixed_point_bound_are_refused(site_keys):
    ctx = MaskContext(job_id=JOB, round=0, attempt=0, participants=SITES, total_weight=40.0, clip_range=1.0)
    aggregator = MaskedSumAggregator()
    aggregator.expect(ctx)
    for site in SITES:
        n = {"site-1": 17, "site-2": 20, "site-3": 9}[site]  # each within the bound, together 46 > 40
        private, directory = site_keys
        mask_filter = SecureMaskFilter(private_key_file=str(private[site]), key_directory_file=str(directory))
        result = DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(8, np.float32)},
                     meta={"n_samples": n, MASK_CONTEXT_KEY: ctx.to_meta()})
        model = FLModelUtils.from_shareable(mask_filter.process(result.to_shareable(), make_fl_ctx(site, JOB)))
        model.meta["client_name"] = site
        assert model.params["w"].dtype == np.uint32 and MASKED_DATA_KIND == DataKind.APP_DEFINED
        aggregator.accept_model(model)
    with pytest.raises(MaskRangeExceeded, match="add up to 46"):
        aggregator.aggregate_model()


def test_a_restarted_site_still_refuses_to_mask_twice_for_one_attempt(site_keys, tmp_path):
    private, directory = site_keys

    def fresh_filter():  # what a client restart gives: a new filter, the same state folder
        return SecureMaskFilter(private_key_file=str(private["site-1"]), key_directory_file=str(directory),
                                state_dir=str(tmp_path / "state"))

    update = {"w": np.zeros(10, np.float32)}
    mask_at_site("site-1", update, context(attempt=0), site_keys, fresh_filter())
    with pytest.raises(MaskingError, match="already masked"):
        mask_at_site("site-1", update, context(attempt=0), site_keys, fresh_filter())
    mask_at_site("site-1", update, context(attempt=1), site_keys, fresh_filter())
