"""The one place that imports fabric-chaincode-python, undoing what its import does to logging.

Importing ``fabric_chaincode_python.fabric_shim.logging`` calls ``logging.basicConfig(level=DEBUG)``
on the root logger and logs every ``put_state`` value at INFO on the ``asyncio`` logger
(fabric-chaincode-python 2.5.4). Inside a FLARE process that would flood the logs and write
record contents to them, so the root logger is put back as it was and the shim's logger is
raised to WARNING.
"""

from __future__ import annotations

import logging


def _import_quietly():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from fabric_chaincode_python.fabric_shim import logging as shim_logging  # noqa: F401

    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    shim_logging.LOGGER.setLevel(logging.WARNING)


_import_quietly()

from fabric_chaincode_python.fabric_contract_api import Contract, ContractChaincode, TransactionContext  # noqa: E402
from fabric_chaincode_python.fabric_shim.stub import ChaincodeStub  # noqa: E402

__all__ = ["Contract", "ContractChaincode", "TransactionContext", "ChaincodeStub"]
