"""Real-data attribution benchmarks and microbenchmarks, run with ``python -m benchmarks.<name>``."""
