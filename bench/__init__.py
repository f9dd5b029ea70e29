"""Benchmarks of the Paddle port against the PyTorch reference; ratios measured within one run."""
