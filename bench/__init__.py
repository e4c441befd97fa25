"""Benchmarks: `python -m bench.ops` (fused ops vs reference)."""
