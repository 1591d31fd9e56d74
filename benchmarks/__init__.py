"""Benchmarks of distilqa against transformers; run the scripts, e.g. ``python benchmarks/forward.py``."""
