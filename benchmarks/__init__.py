"""Throughput benchmarks (clips/s per GPU); run with `python -m benchmarks.run`."""
