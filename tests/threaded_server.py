"""An ASGI app served by uvicorn on a free loopback port in a thread of the test process: the
fake remote services of the upstream tests (a third-party OIP endpoint, a second gateway)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def serve_in_thread(
    app: Any, name: str = "server", **config: Any
) -> Iterator[tuple[str, uvicorn.Server]]:
    """``app`` served at the yielded URL until the block ends; ``config``: more
    ``uvicorn.Config`` options (e.g. ``lifespan="off"`` for a bare FastAPI fake)."""
    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,  # the server binds a free port itself: none freed and reused
        "log_level": "warning",
        "ws": "none",
        "timeout_graceful_shutdown": 2,
        **config,
    }
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive(), f"{name} failed to start"
            assert time.monotonic() < deadline, f"{name} did not start within 20 s"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=10)
