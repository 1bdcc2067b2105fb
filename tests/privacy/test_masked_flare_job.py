"""Masked FedAvg in real FLARE processes (simulator): a site drops out, the round is redone."""

from __future__ import annotations

import numpy as np
import pytest
from flare_parts import ScriptedUpdateExecutor, scripted_update
from nvflare.job_config.defs import FilterType
from nvflare.fuel.utils import fobs
from nvflare.job_config.api import FedJob
from privacy_helpers import SITE_SAMPLES, SITES

from clinfed.aggregators.masked_sum import MaskedFedAvg
from clinfed.filters.secure_mask import SecureMaskFilter

SIZE = 2000


@pytest.mark.timeout(300)
def test_dropped_site_leads_to_a_redo_and_the_exact_aggregate(tmp_path, site_keys):
    private, directory = site_keys
    job = FedJob(name="masked_dropout", min_clients=3)
    job.to_server(MaskedFedAvg(num_clients=3, num_rounds=2, persistor_id="", model={"w": [0.0] * SIZE},
                               clip_range=0.5, weight_bound=100.0, train_timeout=60))
    for site in SITES:
        job.to(ScriptedUpdateExecutor(n_samples=SITE_SAMPLES[site], fail_round=1 if site == "site-3" else -1),
               site, tasks=["train"])
        for filter_type in (FilterType.TASK_DATA, FilterType.TASK_RESULT):
            job.to(SecureMaskFilter(private_key_file=str(private[site]), key_directory_file=str(directory)),
                   site, filter_type=filter_type, tasks=["train"])
    job.simulator_run(str(tmp_path / "workspace"), threads=3)

    saved = list((tmp_path / "workspace").rglob("FL_global_model.pt"))
    assert len(saved) == 1, "the job did not finish its rounds"
    final = np.asarray(fobs.loadf(str(saved[0])).params["w"], dtype=np.float64)

    def weighted_mean(sites, round_):
        total = sum(SITE_SAMPLES[s] for s in sites)
        return sum(SITE_SAMPLES[s] * scripted_update(s, round_, "w", SIZE).astype(np.float64) for s in sites) / total

    # Round 0 from all three; round 1 redone (attempt 1) without site-3, which failed attempt 0.
    expected = weighted_mean(SITES, 0) + weighted_mean(["site-1", "site-2"], 1)
    assert np.linalg.norm(final - expected) / np.linalg.norm(expected) < 1e-6
    server_log = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "workspace").rglob("log.txt"))
    assert "redoing round 1 with ['site-1', 'site-2']" in server_log
