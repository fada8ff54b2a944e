"""The application layer: the ``fides`` command line (:mod:`fides.cli`), the benchmarks
(:mod:`fides.bench`) and the builders of the embedded default models (:mod:`fides.defaults`).
It may use every other package; none of them imports it (`make lint` holds that)."""

import os as _os

# onnxruntime's telemetry writes a device id and an event database under ~/.cache (XDG cache)
# at import: a server process writes only where its settings point (a read-only container
# root), so it is off unless the environment says otherwise.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def main() -> None:
    """The ``fides`` command; says what to install when only the client SDK is."""
    try:
        from fides.cli import main as run
    except ImportError as exc:
        raise SystemExit(
            f"the fides command needs the server extra ({exc.name} is missing): "
            'pip install "fides-gateway[server]"'
        ) from None
    run()
