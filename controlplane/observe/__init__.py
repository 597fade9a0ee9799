"""Watching the fleet take the config: convergence of changes, and rejected config."""
