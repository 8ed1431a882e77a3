"""Benchmark scripts and the ``quality`` subcommand of tools/benchmark.py (not part of the mimkit package)."""
