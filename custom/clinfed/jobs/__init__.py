"""Python definitions of the FLARE jobs exported into the repository's jobs/ folder."""
