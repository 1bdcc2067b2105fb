"""clinfed's Fabric chaincode: the audit contract, run by peers as a service and in-process by LocalLedger."""

from .contract import CONTRACT_NAME, META_FIELDS, RECORD_FIELDS, ChaincodeError, ClinfedContract, canonical_json


def new_chaincode(clock=None):
    """The contract wrapped as a fabric-chaincode-python ``ContractChaincode`` (what a peer talks to).

    ``clock`` (seconds since the epoch) replaces the node's clock for the contract's time-skew
    check; LocalLedger passes the commit time when it replays a block."""
    from ._shim import ContractChaincode

    contract = ClinfedContract()
    if clock is not None:
        contract._clock = clock
    return ContractChaincode.new_chaincode(contract)


__all__ = ["CONTRACT_NAME", "META_FIELDS", "RECORD_FIELDS", "ChaincodeError", "ClinfedContract", "canonical_json",
           "new_chaincode"]
