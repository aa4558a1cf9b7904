"""Benchmarks of every op against its peers: ``python -m benchmarks [--family varlen]
[--quick]``."""
