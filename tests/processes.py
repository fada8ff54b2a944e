"""Stopping the processes tests start, by pid, even when the test failed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

STOP_TIMEOUT_S = 15.0


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM by pid, wait, then SIGKILL if it is still there."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout_s)
