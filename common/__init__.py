"""Pieces every Tessera package shares: typed configuration and user-facing errors."""
