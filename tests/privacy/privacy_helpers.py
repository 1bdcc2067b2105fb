"""Helpers shared by the privacy tests: site names, FLARE contexts, small synthetic volumes."""

from __future__ import annotations

import torch
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext

SITES = ("site-1", "site-2", "site-3")
SITE_SAMPLES = {"site-1": 17, "site-2": 41, "site-3": 9}
ROI = (16, 16, 16)
EHR_SIZE = 12  # the liver study's features and missing-indicators (FusionSegNet's default)


def make_fl_ctx(site: str = "site-1", job_id: str = "job-1", direction: str = FilterKey.OUT,
                task_id: str = "task-1") -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=False)
    fl_ctx.set_prop(FLContextKey.FILTER_DIRECTION, direction, private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.TASK_ID, task_id, private=True, sticky=False)
    return fl_ctx


def synthetic_batch(n: int, seed: int) -> list[dict]:
    """Volumes with a bright blob as the lesion: enough signal for a real gradient."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        label = torch.zeros(1, *ROI)
        c = torch.randint(4, 12, (3,), generator=g)
        label[0, c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 3:c[2] + 3] = 1
        image = torch.randn(1, *ROI, generator=g) * 0.3 + label * 2
        items.append({"image": image, "label": label, "ehr": torch.randn(EHR_SIZE, generator=g),
                      "outcome": torch.tensor(float(torch.rand(1, generator=g) > 0.5)),
                      "has_outcome": torch.tensor(1.0)})
    return items
