"""Benchmarks: runnable modules that print tables (``python -m qsweep.bench.evaluate``); not tests."""
