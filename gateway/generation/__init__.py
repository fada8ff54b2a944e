"""Text generation with speculative decoding: config, runtime, engine, service (``/v1``).

Importing this package does not import torch or transformers; the runtime does, lazily.
"""
