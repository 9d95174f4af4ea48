"""Readers and writers of the benchmarks' official file formats."""
