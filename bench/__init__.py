"""Benchmarks of the suite (issue 7): ``python bench/run.py`` measures everything and writes BENCHMARKS.md."""
