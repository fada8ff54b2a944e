"""A real Prometheus and Alertmanager for tests, and a webhook receiver that records what
Alertmanager sends.

Both servers are Debian's binaries (``prometheus``, ``prometheus-alertmanager``), installed by
``make deploy-tools``; a missing one fails the test with that command (never a skip). Each
listens on a loopback port chosen free at run time, keeps its data and config in the test's
temporary folder, writes its log to a file, and is stopped by its pid on the way out
(:func:`tests.processes.stop_process`), also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from tests.e2e.conftest import HOST, free_port
from tests.processes import stop_process

__all__ = [
    "MonitorProcess",
    "WebhookReceiver",
    "require_binary",
    "running_alertmanager",
    "running_prometheus",
    "wait_for",
]

READY_TIMEOUT_S = 30.0
T = TypeVar("T")


def require_binary(name: str) -> str:
    """The path of ``name`` on PATH; fails the test with the way to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not on PATH. The alerting test runs the real Prometheus and "
            "Alertmanager: run `make deploy-tools` (as root it apt-get installs Debian's "
            "prometheus and prometheus-alertmanager packages).",
            pytrace=False,
        )
    return path


@dataclass
class MonitorProcess:
    """A running Prometheus or Alertmanager: where it listens, its process and its log."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def _running(
    name: str, argv: Callable[[int], list[str]], workdir: Path, attempts: int = 3
) -> Iterator[MonitorProcess]:
    """Start ``argv(port)`` on a free port, wait for ``/-/ready``, always stop it by pid."""
    failure = ""
    for _ in range(attempts):
        port = free_port()
        log_path = workdir / f"{name}-{port}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                argv(port),
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C on pytest does not reach it; we stop it
            )
        mon = MonitorProcess(name, port, process, log_path)
        try:
            why = _wait_ready(mon)
            if why is None:
                yield mon
                return
        finally:
            stop_process(process)
        log = mon.log()
        failure = f"{name} (pid {process.pid}) {why}\n--- {name} log ---\n{log}"
        # another process took the port between free_port() and the bind: try another one
        if "address already in use" not in log.lower():
            break
    pytest.fail(failure, pytrace=False)


def _wait_ready(mon: MonitorProcess) -> str | None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer yet"
    with httpx.Client(base_url=mon.base_url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if mon.process.poll() is not None:
                return f"exited early with status {mon.process.returncode}"
            try:
                r = client.get("/-/ready")
                if r.status_code == 200:
                    return None
                last = f"{r.status_code} {r.text.strip()}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
    return f"not ready after {READY_TIMEOUT_S:.0f}s; last: {last}"


@contextlib.contextmanager
def running_alertmanager(
    workdir: Path, webhook_url: str, *, group_wait: str = "1s", group_interval: str = "1s"
) -> Iterator[MonitorProcess]:
    """Alertmanager routing every alert, one notification per alert (``group_by: [...]``), to
    ``webhook_url`` with resolved notifications on. Clustering is off (no port 9094)."""
    binary = require_binary("prometheus-alertmanager")
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "route": {
            "receiver": "test-webhook",
            "group_by": ["..."],
            "group_wait": group_wait,
            "group_interval": group_interval,
            "repeat_interval": "1h",
        },
        "receivers": [
            {
                "name": "test-webhook",
                "webhook_configs": [{"url": webhook_url, "send_resolved": True}],
            }
        ],
    }
    config_path = workdir / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    storage = workdir / "alertmanager-data"

    def argv(port: int) -> list[str]:
        return [
            binary,
            f"--config.file={config_path}",
            f"--storage.path={storage}",
            f"--web.listen-address={HOST}:{port}",
            "--cluster.listen-address=",
            "--log.level=debug",
        ]

    with _running("alertmanager", argv, workdir) as am:
        yield am


@contextlib.contextmanager
def running_prometheus(
    workdir: Path,
    *,
    scrape_target: str,
    alertmanager: str,
    rule_files: Sequence[Path],
    interval: str = "1s",
) -> Iterator[MonitorProcess]:
    """Prometheus scraping ``scrape_target``'s ``/metrics`` (job ``fides-gateway``) and
    evaluating ``rule_files`` (loaded from where they are, not copied) every ``interval``,
    sending alerts to ``alertmanager`` (``host:port``)."""
    binary = require_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(p.resolve()) for p in rule_files],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [
            {
                "job_name": "fides-gateway",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [scrape_target]}],
            }
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    storage = workdir / "prometheus-data"

    def argv(port: int) -> list[str]:
        return [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={storage}",
            f"--web.listen-address={HOST}:{port}",
            "--log.level=debug",
        ]

    with _running("prometheus", argv, workdir) as prom:
        yield prom


class WebhookReceiver:
    """An HTTP server on loopback recording every JSON body POSTed to it (Alertmanager's
    webhook notifications); a context manager that stops it on exit."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.notifications.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base name
                pass

        self._server = ThreadingHTTPServer((HOST, 0), Handler)  # port 0: no race for it
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}/alerts"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def alerts(self, status: str | None = None, **labels: str) -> list[dict[str, Any]]:
        """Alerts received so far (each notification's ``alerts``), filtered by status and
        labels."""
        with self._lock:
            received = [a for n in self.notifications for a in n.get("alerts", [])]
        return [
            a
            for a in received
            if (status is None or a.get("status") == status)
            and all(a.get("labels", {}).get(k) == v for k, v in labels.items())
        ]


def wait_for(
    check: Callable[[], T | None], timeout_s: float, what: str, context: Callable[[], str]
) -> T:
    """Poll ``check`` until it returns something other than None/False/empty; fail with
    ``context()`` (the servers' logs and state) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s: {what}\n{context()}", pytrace=False)
        time.sleep(0.25)
