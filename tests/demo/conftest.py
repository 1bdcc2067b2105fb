import pytest

from demo_run import shared_demo_run


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``make demo`` of the quick demo with 2 rounds, run once for the whole session (tests/demo_run.py)."""
    return shared_demo_run(tmp_path_factory)
