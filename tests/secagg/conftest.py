"""Fixtures: a five-site consortium with each site's own masking key on a LocalLedger."""

from __future__ import annotations

import pytest
from secagg_helpers import Consortium, site_names


@pytest.fixture
def consortium5(tmp_path) -> Consortium:
    return Consortium(tmp_path, site_names(5))
