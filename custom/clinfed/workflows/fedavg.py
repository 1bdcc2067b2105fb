"""FLARE's FedAvg workflow with its arguments checked when FLARE builds it.

FLARE's own ``FedAvg`` takes ``num_rounds: -1`` and runs no round at all: the job ends
``FINISHED:COMPLETED`` having trained nothing and recorded nothing. Here the job fails at deploy
instead, and the server's log names the argument (``num_rounds: must be >= 1, got -1``).
"""

from __future__ import annotations

from nvflare.app_common.workflows.fedavg import FedAvg as FlareFedAvg

from clinfed import arguments


class FedAvg(FlareFedAvg):
    """``nvflare.app_common.workflows.fedavg.FedAvg``, same arguments, checked: ``num_clients``
    and ``num_rounds`` >= 1, ``start_round`` >= 0, ``task_check_period`` > 0."""

    def __init__(self, *args, **kwargs):
        if "task_check_period" in kwargs:
            arguments.positive_number("task_check_period", kwargs["task_check_period"])
        super().__init__(*args, **kwargs)
        arguments.positive_int("num_clients", self.num_clients)
        arguments.positive_int("num_rounds", self.num_rounds)
        arguments.positive_int("start_round", self.start_round, minimum=0)
