"""Networks trained by the consortium."""
