"""Benchmarks: `python -m bench` (`make bench`); see bench/RESULTS.md."""
