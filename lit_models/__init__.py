"""LightningModules, one per method; pure-PyTorch building blocks live in :mod:`lit_models.nn`."""
