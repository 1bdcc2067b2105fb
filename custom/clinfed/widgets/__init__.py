"""Server-side FLARE widgets that record what happened in a run."""
