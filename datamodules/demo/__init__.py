"""Builders of the offline demo datasets from installed packages (built at run time, never committed)."""
