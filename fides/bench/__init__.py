"""Benchmarks behind ``fides bench`` (results in ``bench/results/``).

``serving``: throughput and latency of raw onnxruntime (the ceiling) against the gateway over
JSON and over binary tensors, at several client concurrencies.
"""
