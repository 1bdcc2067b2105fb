"""The one error type of fabric_network."""


class FabricNetworkError(Exception):
    """A step of bringing the network up or down failed; the message says which and where the log is."""
