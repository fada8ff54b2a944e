"""Fides Gateway: a model-serving inference gateway with integrity verification.

The HTTP surface (``gateway.api``) is thin; serving logic lives in ``gateway.dataplane``;
each framework is wrapped by one runtime in ``gateway.runtimes``.
"""

__version__ = "0.1.0"

import os as _os

# onnxruntime's telemetry writes a device id and an event database under ~/.cache (XDG cache)
# at import: a server process writes only where its settings point (a read-only container
# root), so it is off unless the environment says otherwise.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
