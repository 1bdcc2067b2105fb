"""The executor, the workflow and the recipe refuse a bad argument when they are built, naming it.

FLARE builds components from the job's config at deploy, so these refusals are what a job with a
bad config fails with (tests/consortium/test_consortium_deployment.py shows it on real FLARE).
"""

from __future__ import annotations

import math

import pytest

from clinfed.errors import ArgumentError, ConfigError
from clinfed.executors.seg_executor import SegExecutor
from clinfed.jobs.tumour_seg import TumourSegFedAvgRecipe
from clinfed.workflows.fedavg import FedAvg

GOOD_EXECUTOR = {"local_epochs": 1, "batch_size": 2, "lr": 1e-3, "roi": [32, 32, 16]}

BAD_EXECUTOR_ARGUMENTS = [
    ("local_epochs", 0, "must be >= 1"),
    ("local_epochs", -3, "must be >= 1"),
    ("local_epochs", 1.5, "must be an integer"),
    ("local_epochs", "2", "must be an integer"),
    ("local_epochs", True, "must be an integer"),
    ("batch_size", 0, "must be >= 1"),
    ("lr", 0, "must be > 0"),
    ("lr", -1e-3, "must be > 0"),
    ("lr", math.nan, "finite number"),
    ("lr", math.inf, "finite number"),
    ("lr", "1e-3", "finite number"),
    ("roi", [32, 32], "three sizes"),
    ("roi", [33, 32, 16], "multiple of 16"),
    ("roi", [0, 32, 16], "multiple of 16"),
    ("roi", [4096, 32, 16], "between 16 and 1024"),
    ("roi", "32,32,16", "three sizes"),
    ("study", "", "non-empty string"),
    ("ledger_consent", "yes", "true or false"),
    ("dp_target_epsilon", 0, "must be > 0"),
    ("dp_target_epsilon", math.nan, "finite number"),
    ("dp_delta", 1.0, "must be < 1"),
    ("dp_delta", 0, "must be > 0"),
    ("dp_max_grad_norm", -1, "must be > 0"),
    ("dp_accountant", "gdp", "must be one of 'prv', 'rdp'"),
]


@pytest.mark.parametrize("argument,value,problem", BAD_EXECUTOR_ARGUMENTS,
                         ids=[f"{a}={v!r}" for a, v, _ in BAD_EXECUTOR_ARGUMENTS])
def test_executor_refuses_a_bad_argument_naming_it(argument, value, problem):
    with pytest.raises(ArgumentError) as info:
        SegExecutor(**{**GOOD_EXECUTOR, argument: value})
    assert info.value.argument == argument
    assert str(info.value).startswith(f"{argument}: ") and problem in str(info.value)
    # Our own error type (a ConfigError), and still a ValueError for callers that expect one.
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_executor_keeps_good_arguments_in_their_types():
    executor = SegExecutor(local_epochs=2.0, batch_size=3, lr=1, roi=(48, 48, 16), dp_target_epsilon=4,
                           dp_delta=1e-5)
    assert (executor.local_epochs, executor.batch_size, executor.lr, executor.roi) == (2, 3, 1.0, (48, 48, 16))
    assert isinstance(executor.local_epochs, int) and isinstance(executor.lr, float)
    assert executor.dp_target_epsilon == 4.0 and executor.dp_delta == 1e-5


BAD_WORKFLOW_ARGUMENTS = [
    ("num_rounds", -1, "must be >= 1, got -1"),
    ("num_rounds", 0, "must be >= 1"),
    ("num_rounds", 2.5, "must be an integer"),
    ("num_clients", 0, "must be >= 1"),
    ("start_round", -1, "must be >= 0"),
    ("task_check_period", 0, "must be > 0"),
]


@pytest.mark.parametrize("argument,value,problem", BAD_WORKFLOW_ARGUMENTS,
                         ids=[f"{a}={v!r}" for a, v, _ in BAD_WORKFLOW_ARGUMENTS])
def test_workflow_refuses_a_bad_argument_naming_it(argument, value, problem):
    with pytest.raises(ArgumentError) as info:
        FedAvg(**{"num_clients": 2, "num_rounds": 3, argument: value})
    assert info.value.argument == argument and problem in str(info.value)


def test_flare_fedavg_itself_accepts_negative_rounds_which_is_why_ours_checks():
    """The opponent: FLARE's own workflow takes num_rounds -1 (and then runs no round at all)."""
    from nvflare.app_common.workflows.fedavg import FedAvg as FlareFedAvg

    assert FlareFedAvg(num_clients=2, num_rounds=-1).num_rounds == -1
    assert FedAvg(num_clients=2, num_rounds=3).num_rounds == 3


@pytest.mark.parametrize("argument,value", [("num_rounds", 0), ("min_clients", 0), ("privacy", "maximum"),
                                            ("lr", -1.0), ("roi", (30, 32, 16)), ("local_epochs", 0)])
def test_recipe_refuses_a_bad_argument_naming_it(argument, value):
    with pytest.raises(ArgumentError) as info:
        TumourSegFedAvgRecipe(**{argument: value})
    assert info.value.argument == argument
