"""Native (no Docker) Hyperledger Fabric network for clinfed: binaries, crypto, channel, chaincode as a service.

    fabric_network/install.sh                 # build or reuse the pinned binaries
    python -m fabric_network up [--bft]       # start a network and deploy the chaincode
    python -m fabric_network status | down
"""

from .network import (COMMITS, DEFAULT_SITES, DEFAULT_VERSION, ENDORSEMENT_POLICIES, FabricNetworkError, Network,
                      install, installed_home, msp_id_for)

__all__ = ["COMMITS", "DEFAULT_SITES", "DEFAULT_VERSION", "ENDORSEMENT_POLICIES", "FabricNetworkError", "Network",
           "install", "installed_home", "msp_id_for"]
