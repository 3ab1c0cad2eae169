"""Support code for ldapsync's own tests and benchmarks (not used by the service itself)."""
