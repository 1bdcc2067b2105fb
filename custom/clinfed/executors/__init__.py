"""FLARE executors that run at the sites."""
