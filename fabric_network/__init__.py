"""Native (no Docker) Hyperledger Fabric network for clinfed: binaries, crypto, channel, one chaincode service per organisation.

    fabric_network/install.sh                 # build or reuse the pinned binaries
    python -m fabric_network up [--bft]       # start a network and deploy the chaincode
    python -m fabric_network status | stop | start | down
"""

from .binaries import COMMITS, DEFAULT_VERSION, install, installed_home
from .errors import FabricNetworkError
from .network import DEFAULT_SITES, Network, msp_id_for

__all__ = ["COMMITS", "DEFAULT_SITES", "DEFAULT_VERSION", "FabricNetworkError", "Network", "install",
           "installed_home", "msp_id_for"]
