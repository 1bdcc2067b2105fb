"""Server-side FLARE workflows (controllers) of clinfed."""
