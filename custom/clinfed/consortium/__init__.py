"""The consortium: one definition (``provisioning/consortium.yml``), FLARE startup kits and each
participant's local policy generated from it, and a local trial consortium (``up|down|status``)."""

from .definition import Consortium, ConsortiumError, load_consortium, parse_consortium  # noqa: F401
