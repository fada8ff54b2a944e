"""Fides Gateway: a model-serving inference gateway with integrity verification.

The HTTP surface (``gateway.api``) is thin; serving logic lives in ``gateway.dataplane``;
each framework is wrapped by one runtime in ``gateway.runtimes``.
"""

__version__ = "0.1.0"
