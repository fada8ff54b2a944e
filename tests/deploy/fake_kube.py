"""A minimal in-memory Kubernetes API server, just enough for ``helm install`` to run.

helm-sdkpy has no ``helm template``, and its lint drops the error messages; a real install
against this server renders the chart with any values, reports render errors with their text,
and returns the rendered manifest. Objects are stored as sent (no defaulting, no validation:
the tests validate the manifests against the Kubernetes JSON schemas themselves).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# group/version -> [(resource, kind, namespaced)]
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("namespaces", "Namespace", False),
        ("secrets", "Secret", True),
        ("configmaps", "ConfigMap", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("pods", "Pod", True),
        ("persistentvolumeclaims", "PersistentVolumeClaim", True),
    ],
    "apps/v1": [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
    "monitoring.coreos.com/v1": [
        ("servicemonitors", "ServiceMonitor", True),
        ("prometheusrules", "PrometheusRule", True),
    ],
}
KINDS = {(gv, res): kind for gv, items in RESOURCES.items() for res, kind, _ in items}


def _resource_list(gv: str) -> dict[str, Any]:
    verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": [
            {"name": r, "singularName": k.lower(), "namespaced": ns, "kind": k, "verbs": verbs}
            for r, k, ns in RESOURCES[gv]
        ],
    }


def _group_list() -> dict[str, Any]:
    groups = []
    for gv in RESOURCES:
        if "/" not in gv:
            continue
        group, version = gv.split("/")
        ref = {"groupVersion": gv, "version": version}
        groups.append({"name": group, "versions": [ref], "preferredVersion": ref})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKube:
    """Objects by (group/version, resource, namespace, name)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.version = 0

    def stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        meta["resourceVersion"] = str(self.version)
        return obj


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _route(self) -> tuple[str, str, str, str, dict[str, list[str]]] | None:
        """(group/version, resource, namespace, name, query) of a resource path."""
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 2:
            gv, rest = parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return None
        namespace = ""
        if len(rest) >= 2 and rest[0] == "namespaces" and len(rest) != 2:
            namespace, rest = rest[1], rest[2:]
        if not rest or (gv, rest[0]) not in KINDS:
            return None
        return gv, rest[0], namespace, rest[1] if len(rest) > 1 else "", parse_qs(url.query)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/version":
            self._send(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
        elif path == "/api":
            self._send(200, {"kind": "APIVersions", "versions": ["v1"]})
        elif path == "/apis":
            self._send(200, _group_list())
        elif path.startswith(("/api/", "/apis/")) and path.split("/", 2)[2] in RESOURCES:
            self._send(200, _resource_list(path.split("/", 2)[2]))
        elif (route := self._route()) is None:
            self._send(404, _status(404, "NotFound", f"no route {path}"))
        else:
            gv, res, ns, name, query = route
            kube = self.server.kube
            with kube.lock:
                if name:
                    obj = kube.objects.get((gv, res, ns, name))
                    if obj is None:
                        self._send(404, _status(404, "NotFound", f'{res} "{name}" not found'))
                    else:
                        self._send(200, obj)
                    return
                selector = (query.get("labelSelector") or [""])[0]
                items = [
                    o
                    for (g, r, n, _), o in kube.objects.items()
                    if (g, r) == (gv, res)
                    and (not ns or n == ns)
                    and _matches(o.get("metadata", {}).get("labels") or {}, selector)
                ]
                self._send(
                    200,
                    {
                        "kind": KINDS[(gv, res)] + "List",
                        "apiVersion": gv,
                        "metadata": {"resourceVersion": str(kube.version)},
                        "items": items,
                    },
                )

    def do_POST(self) -> None:
        route = self._route()
        if route is None:
            self._send(404, _status(404, "NotFound", self.path))
            return
        gv, res, ns, _, _ = route
        obj = self._body()
        name = obj.get("metadata", {}).get("name", "")
        kube = self.server.kube
        with kube.lock:
            key = (gv, res, ns, name)
            if key in kube.objects:
                self._send(409, _status(409, "AlreadyExists", f'{res} "{name}" exists'))
                return
            kube.objects[key] = kube.stamp(obj)
            self._send(201, obj)

    def do_PUT(self) -> None:
        route = self._route()
        if route is None:
            self._send(404, _status(404, "NotFound", self.path))
            return
        gv, res, ns, name, _ = route
        kube = self.server.kube
        with kube.lock:
            obj = kube.stamp(self._body())
            kube.objects[(gv, res, ns, name)] = obj
            self._send(200, obj)

    def do_PATCH(self) -> None:
        route = self._route()
        kube = self.server.kube
        if route is None or (route[0], route[1], route[2], route[3]) not in kube.objects:
            self._send(404, _status(404, "NotFound", self.path))
            return
        self._body()
        with kube.lock:
            self._send(200, kube.objects[route[:4]])

    def do_DELETE(self) -> None:
        route = self._route()
        kube = self.server.kube
        with kube.lock:
            obj = kube.objects.pop(route[:4], None) if route else None
        if obj is None:
            self._send(404, _status(404, "NotFound", self.path))
        else:
            self._send(200, obj)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.kube = FakeKube()


@contextmanager
def fake_kube_api() -> Iterator[tuple[str, FakeKube]]:
    """Serve a fake API on a free loopback port; yields (kubeconfig YAML, store)."""
    server = _Server()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-kube", daemon=True
    )
    thread.start()
    host, port = server.server_address[:2]
    kubeconfig = f"""apiVersion: v1
kind: Config
clusters:
  - name: fake
    cluster:
      server: http://{host}:{port}
contexts:
  - name: fake
    context: {{cluster: fake, user: fake, namespace: default}}
current-context: fake
users:
  - name: fake
    user: {{token: fake}}
"""
    try:
        yield kubeconfig, server.kube
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
