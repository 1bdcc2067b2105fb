"""What reaches the model: never a NaN or an infinity (refused naming the case, issue 14), and
volumes of any spacing resampled to the study's before patches are drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clinfed.data.ingest import Case
from clinfed.training import DEFAULT_EHR_SIZE, NonFiniteInput, TrainConfig, make_loader

ROI = (16, 16, 16)


def _case(i: int, spacing=(1.0, 1.0, 1.0), shape=ROI, modality: str = "MR") -> Case:
    rng = np.random.default_rng(i)
    label = np.zeros(shape, dtype=np.uint8)
    label[4:10, 4:10, 4:10] = 1
    image = (rng.normal(size=shape) + 3.0 * label + 10.0).astype(np.float32)
    return Case(f"p-{i:032x}", image, label, spacing, rng.normal(size=DEFAULT_EHR_SIZE).astype(np.float32), i % 2,
                modality=modality, case_id=f"p-study-{i:026x}")


@pytest.mark.parametrize("where", ["image", "ehr"])
@pytest.mark.parametrize("train", [True, False])
def test_a_non_finite_value_is_refused_naming_the_case(where, train):
    bad = _case(1)
    getattr(bad, where)[(0,) * getattr(bad, where).ndim] = np.inf if where == "ehr" else np.nan
    config = TrainConfig(roi=ROI, batch_size=1)
    with pytest.raises(NonFiniteInput) as caught:
        make_loader([_case(0), bad], config, train=train)
    assert "case p-study-" + f"{1:026x}" in str(caught.value)
    assert "NaN or infinite" in str(caught.value)


def test_volumes_are_resampled_to_the_study_spacing_and_normalised_per_modality():
    config = TrainConfig(roi=ROI, batch_size=1, spacing=(1.0, 1.0, 2.0))
    # 0.5 mm in-plane, 1 mm slices: at the study's 1 x 1 x 2 mm the volume halves on every axis.
    case = _case(0, spacing=(0.5, 0.5, 1.0), shape=(32, 32, 32))
    (batch,) = list(make_loader([case], config, train=False))
    assert tuple(batch["image"].shape[2:]) == (16, 16, 16)
    image = batch["image"][0, 0]
    assert abs(float(image.mean())) < 0.05 and abs(float(image.std()) - 1.0) < 0.05  # MR: z-score
    assert set(torch.unique(batch["label"]).tolist()) == {0.0, 1.0}  # nearest: still a binary label
    ct = _case(0, modality="CT")
    ct.image[:] = 50.0  # HU inside the default (liver) window [-50, 150]
    (batch,) = list(make_loader([ct], TrainConfig(roi=ROI, batch_size=1, spacing=(1.0, 1.0, 1.0)), train=False))
    assert torch.allclose(batch["image"], torch.tensor(0.5))  # (50 + 50) / 200
