"""Benchmarks: speed and method-claim measurements, run by hand (see each script's docstring); not tests."""
