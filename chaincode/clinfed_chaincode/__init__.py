"""clinfed's Fabric chaincode: the audit contract, run by peers as a service and in-process by LocalLedger."""

from .contract import CONTRACT_NAME, ChaincodeError, ClinfedContract, canonical_json


def new_chaincode():
    """The contract wrapped as a fabric-chaincode-python ``ContractChaincode`` (what a peer talks to)."""
    from ._shim import ContractChaincode

    return ContractChaincode.new_chaincode(ClinfedContract())


__all__ = ["CONTRACT_NAME", "ChaincodeError", "ClinfedContract", "canonical_json", "new_chaincode"]
