import pytest

from demo_run import shared_demo_run


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``clinfed demo --quick --rounds 2``, run once for the whole session (see tests/demo_run.py)."""
    return shared_demo_run(tmp_path_factory)
