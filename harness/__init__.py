"""Helpers that the tests and the benchmarks share: start the real service, encode pictures, read metrics."""
