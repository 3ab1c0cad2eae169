"""Benchmark harness for ldapsync (issue 6): not part of the test run; `python -m bench`."""
