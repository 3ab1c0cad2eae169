"""Benchmark harness for ldapsync: not part of the test run; `python -m bench`."""
