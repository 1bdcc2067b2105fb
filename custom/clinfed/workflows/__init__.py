"""Server workflows of our jobs."""
