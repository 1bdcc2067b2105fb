"""Sites drop after setup; the round completes from the survivors without anyone training or
uploading twice, exactly, or is abandoned with its reason when too few are left."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_helpers import final_model, logs
from secagg_parts import ScriptedTrainer, weighted_mean


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dropped", [["site-2"], ["site-2", "site-5"]])
def test_round_completes_from_the_survivors_exactly(consortium5, dropped):
    # Round 0 with all five sites; the sites in ``dropped`` fail round 1 after its setup.
    trainers = {site: ScriptedTrainer(fail_round=1) for site in dropped}
    workspace = consortium5.run(trainers=trainers, rounds=2, name=f"drop{len(dropped)}")
    survivors = [s for s in consortium5.sites if s not in dropped]
    final = final_model(workspace)
    assert final is not None, "the rounds did not complete"
    expected = weighted_mean(consortium5.sites, 0) + weighted_mean(survivors, 1)
    assert np.linalg.norm(final - expected) / np.linalg.norm(expected) < 1e-6
    server = logs(workspace, "server")
    assert f"sum of {survivors} opened (dropped: {dropped})" in server
    # Each surviving site trained, masked and uploaded once in the round; nobody was asked twice.
    for site in survivors:
        assert logs(workspace, site).count("round 1: masked input sent") == 1


@pytest.mark.timeout(300)
def test_more_drops_than_the_threshold_abandon_the_round_and_publish_nothing(consortium5):
    dropped = ["site-2", "site-3", "site-5"]  # 2 of 5 left, threshold 3
    workspace = consortium5.run(trainers={site: ScriptedTrainer(fail_round=0) for site in dropped}, name="drop3")
    assert final_model(workspace) is None
    assert "round 0 abandoned, nothing published: only 2 sites sent a masked input" in logs(workspace, "server")
