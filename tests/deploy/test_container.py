"""The image, built and run for real with a Docker engine (issue 24).

``scripts/container.py`` builds deploy/Dockerfile (its base image made from Debian's packages
where no registry answers); the tests run the image as docs/deploy.md says, with a read-only
root, no capabilities and only the documented volumes writable, and check what a user relies
on: ready only once the enclave is attested (and not ready, naming why, when its simulated
evidence is not accepted), a verified answer, a drill flagged, SIGTERM drains and keeps the
alarm state; then the compose stack with real Prometheus and Alertmanager containers carries
a drill's ``FidesAttackDetected`` alert to Alertmanager over the container network.

The image is the real one, default models baked in at build time; which digits its freshly
trained models answer clearly is read from those models (tests/integrity_factory.py), so no
test depends on how one training run turned out. Where no engine can run, the module is
skipped with the reason; `.ci/run` installs Debian's docker.io so CI always runs it, and the
engine, when this module starts it, is stopped by its process id. Every container, volume and
network a test makes is removed, even when it fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import ADMIN_KEY, USER_KEY
from tests.deploy.conftest import DEPLOY, ROOT
from tests.e2e.conftest import free_port
from tests.integrity_factory import Digits, infer_body, typical_digits
from tests.processes import stop_process

# the first build of the image (base, dependencies, default models) takes 10 to 15 minutes
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

IMAGE = "fides-gateway:cpu"  # the name deploy/compose.yaml uses
READY_TIMEOUT_S = 180
ALERT_TIMEOUT_S = 240


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("container", ROOT / "scripts" / "container.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


container = _load_script()


def docker(*args: str, timeout_s: float = 120, check: bool = True) -> str:
    done = subprocess.run(
        [container.docker(), *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@pytest.fixture(scope="module")
def engine() -> Iterator[None]:
    """A Docker engine: the running one, or dockerd started here (as root) and stopped by pid."""
    problem = container.engine_problem()
    daemon = None
    if problem and os.geteuid() == 0 and shutil.which("dockerd"):
        log = Path(tempfile.mkdtemp(prefix="fides-dockerd-")) / "dockerd.log"
        with log.open("wb") as out:
            daemon = subprocess.Popen(
                ["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while (problem := container.engine_problem()) and time.monotonic() < deadline:
            if daemon.poll() is not None:
                problem = f"dockerd exited ({daemon.returncode}): {log.read_text()[-800:]}"
                break
            time.sleep(0.5)
    try:
        if problem:
            pytest.skip(
                f"no container engine here: {problem}. `.ci/run` installs Debian's docker.io "
                "(apt-get install docker.io debootstrap docker-compose) so CI runs these tests"
            )
        yield
    finally:
        if daemon is not None:
            stop_process(daemon, timeout_s=30)


@pytest.fixture(scope="module")
def image(engine: None) -> str:
    t0 = time.monotonic()
    container.build_gateway(IMAGE)  # layers are cached: a rebuild of an unchanged tree is quick
    print(
        f"\nimage {IMAGE}: {container.image_size_mb(IMAGE):.0f} MB, "
        f"built in {time.monotonic() - t0:.0f} s"
    )
    return IMAGE


@pytest.fixture(scope="module")
def image_digits(image: str, tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """Clear cases for the models baked into the image, read from a copy of them."""
    out = tmp_path_factory.mktemp("image-repo")
    cid = docker("create", image)
    try:
        docker("cp", f"{cid}:/opt/fides/model_repository", str(out))
    finally:
        docker("rm", "-f", cid)
    return typical_digits(out / "model_repository")


class Running:
    """A container started by a test; ``remove`` takes it and its volumes away."""

    def __init__(self, name: str, volumes: list[str]) -> None:
        self.name, self.volumes = name, volumes

    @property
    def base_url(self) -> str:
        host_port = docker("port", self.name, "8000/tcp").splitlines()[0].rsplit(":", 1)[1]
        return f"http://127.0.0.1:{host_port}"

    def logs(self, tail: int = 60) -> str:
        done = subprocess.run(
            [container.docker(), "logs", "--tail", str(tail), self.name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.stdout + done.stderr

    def state(self) -> dict[str, Any]:
        return dict(json.loads(docker("inspect", "--format", "{{json .State}}", self.name)))

    def remove(self, volumes: bool = True) -> None:
        docker("rm", "-f", self.name, check=False)
        if volumes:
            for volume in self.volumes:
                docker("volume", "rm", "-f", volume, check=False)


@contextlib.contextmanager
def run_gateway(image: str, env: dict[str, str], tag: str) -> Iterator[Running]:
    """The image run as docs/deploy.md says (scripts/container.py's hardened arguments)."""
    name = f"fides-test-{tag}-{uuid.uuid4().hex[:8]}"
    args = container.hardened_run_args(name, {"FIDES_API_KEYS": USER_KEY, **env})
    volumes = [args[i + 1].split(":")[0] for i, a in enumerate(args) if a == "-v"]
    c = Running(name, volumes)
    try:
        docker("run", "-d", *args, image)
        yield c
    finally:
        c.remove()


def wait_until(
    c: Running, predicate: Any, timeout_s: float = READY_TIMEOUT_S, what: str = "ready"
) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if not c.state()["Running"]:
            pytest.fail(f"container exited before {what}: {c.state()}\n{c.logs()}")
        with contextlib.suppress(httpx.HTTPError, IndexError, AssertionError):
            last = predicate()
            if last:
                return last
        time.sleep(1)
    pytest.fail(f"not {what} within {timeout_s} s (last: {last})\n{c.logs()}")


def infer(client: httpx.Client, x: np.ndarray) -> httpx.Response:
    return client.post("/v2/models/digits/infer", json=infer_body(x))


def test_read_only_container_verifies_flags_a_drill_and_drains(
    image: str, image_digits: Digits
) -> None:
    env = {
        "FIDES_ADMIN_API_KEYS": ADMIN_KEY,
        "FIDES_ENCLAVE_INIT_PLATFORM": "1",  # a platform made in its volume at first start
        "FIDES_ENCLAVE_ALLOW_SIMULATED": "1",
    }
    x = image_digits.take(8, seed=3)
    with (
        run_gateway(image, env, "verify") as c,
        httpx.Client(base_url=c.base_url, headers={"X-API-Key": USER_KEY}, timeout=30) as user,
    ):
        wait_until(c, lambda: httpx.get(c.base_url + "/v2/health/ready").status_code == 200)
        admin = {"X-API-Key": ADMIN_KEY}
        status = user.get("/v2/models/digits/integrity").json()
        assert status["enclave"]["state"] == "up", status
        assert status["enclave"]["simulated"] is True

        verdicts = [infer(user, x[i : i + 1]).json()["parameters"] for i in range(len(x))]
        assert [v["integrity_verdict"] for v in verdicts] == ["verified"] * len(x)

        r = user.put("/v2/admin/models/digits/drill", json={"attack": "switch", "rate": 1.0},
                     headers=admin)  # fmt: skip
        assert r.status_code == 200, r.text
        flagged = [infer(user, x[i : i + 1]).json()["parameters"] for i in range(len(x))]
        assert [f["integrity_verdict"] for f in flagged] == ["attack"] * len(x)
        assert user.delete("/v2/admin/models/digits/drill", headers=admin).status_code == 200
        answers = user.get("/v2/models/digits/integrity").json()["alarm"]["model"]["answers"]
        assert answers >= 2 * len(x)

        # SIGTERM while a generation streams and inferences go on: the stream, in flight by
        # construction (its first tokens are out), is finished; every answer that comes back
        # is a 200 or a 503 (shutting down). Connection errors are not counted: through the
        # engine's port proxy a connection refused after the listener closed looks the same
        # as one dropped, so the stream is the in-flight request that must survive.
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=c.base_url, headers={"X-API-Key": USER_KEY}) as cl:
                while not stop.is_set():
                    with contextlib.suppress(httpx.TransportError):
                        statuses.append(infer(cl, x[:1]).status_code)

        worker = threading.Thread(target=load)
        worker.start()
        # the load is under way before the signal (on a loaded machine the thread's first
        # request could otherwise still be connecting when the listener closes)
        wait_until(c, lambda: statuses.count(200) > 0, what="the first answer under load")
        body = {"model": "code", "prompt": "def ", "max_tokens": 240, "temperature": 1.0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        events: list[str] = []
        t_signal = 0.0
        with user.stream("POST", "/v1/completions", json=body) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:  # SIGTERM with the stream in flight
                        docker("kill", "--signal", "TERM", c.name)
                        t_signal = time.monotonic()
        exit_code = docker("wait", c.name, timeout_s=60)  # the gateway's own exit
        stopped_in = time.monotonic() - t_signal
        stop.set()
        worker.join(timeout=30)
        assert exit_code == "0", (exit_code, c.logs())
        assert stopped_in < 25, f"SIGTERM took {stopped_in:.1f} s"
        assert events[-1] == "[DONE]", events[-3:]  # the stream went on to its end
        assert "draining in-flight requests" in c.logs(tail=400)  # the graceful path
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length", events[-2]
        assert statuses.count(200) > 0
        assert set(statuses) <= {200, 503}, sorted(set(statuses))

        # the alarm state was saved in its volume on the way out: a new container resumes it
        docker("rm", c.name)
        again = f"{c.name}-again"
        args = container.hardened_run_args(
            again,
            {"FIDES_API_KEYS": USER_KEY, **env},
            volumes={v: p for v, p in zip(c.volumes, _mounts(), strict=True)},
        )
        c2 = Running(again, [])
        try:
            docker("run", "-d", *args, image)
            wait_until(c2, lambda: httpx.get(c2.base_url + "/v2/health/ready").status_code == 200)
            resumed = httpx.get(
                c2.base_url + "/v2/models/digits/integrity", headers={"X-API-Key": USER_KEY}
            ).json()["alarm"]["model"]["answers"]
            assert resumed >= answers + statuses.count(200)
        finally:
            c2.remove(volumes=False)


def _mounts() -> list[str]:
    """The mount points of hardened_run_args' default volumes, in order."""
    args = container.hardened_run_args("x", {})
    return [args[i + 1].split(":", 1)[1] for i, a in enumerate(args) if a == "-v"]


def test_refused_simulated_evidence_keeps_the_container_unready_and_says_why(image: str) -> None:
    """API keys set (not dev mode) and FIDES_ENCLAVE_ALLOW_SIMULATED unset: the enclave's
    simulated evidence is refused, so the verified model is not ready and nor is the server."""
    env = {"FIDES_ENCLAVE_INIT_PLATFORM": "1"}
    with run_gateway(image, env, "unready") as c:

        def refused() -> dict[str, Any] | None:
            # which model and why: behind the key (the open probe says only not ready)
            r = httpx.get(c.base_url + "/v2/models/digits/ready", headers={"X-API-Key": USER_KEY})
            return r.json() if r.status_code == 503 and "Simulated" in r.text else None

        body = wait_until(c, refused, what="refusing readiness")
        assert "SimulatedEvidenceRejected" in json.dumps(body), body
        assert httpx.get(c.base_url + "/v2/health/live").status_code == 200
        server = httpx.get(c.base_url + "/v2/health/ready")
        assert server.status_code == 503, server.text
        assert "digits" not in server.text


# -- the compose stack --------------------------------------------------------------------------


def _compose_file(out: Path) -> tuple[Path, dict[str, int]]:
    """deploy/compose.yaml as Debian's Compose v1 (1.29) reads it: without the top-level
    ``name`` (the project name is given with -p), loopback ports moved to free ones (nothing
    else on the machine is disturbed), Grafana left out (no image can be had here)."""
    spec = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    spec.pop("name", None)
    spec = {k: v for k, v in spec.items() if not k.startswith("x-")}
    spec["services"].pop("grafana")
    spec["volumes"].pop("grafana-data")
    ports: dict[str, int] = {}
    for service, body in spec["services"].items():
        body.pop("build", None)  # the image is built by the fixture
        moved = []
        for mapping in body.get("ports", []):
            _, _, target = mapping.split("#")[0].strip().rpartition(":")
            port = free_port()
            ports[f"{service}:{target}"] = port
            moved.append(f"127.0.0.1:{port}:{target}")
        if moved:
            body["ports"] = moved
        body["volumes"] = [  # ./prometheus:/etc/prometheus:ro -> an absolute source
            str((DEPLOY / v.split(":", 1)[0]).resolve()) + ":" + v.split(":", 1)[1]
            if v.startswith("./")
            else v
            for v in body.get("volumes", [])
        ]
        if not body["volumes"]:
            del body["volumes"]
    path = out / "compose.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path, ports


def test_compose_stack_carries_a_drill_alert_to_alertmanager(
    image: str, image_digits: Digits, tmp_path: Path
) -> None:
    compose_cli = shutil.which("docker-compose")
    if compose_cli is None:
        pytest.fail("docker-compose is missing: apt-get install docker-compose", pytrace=False)
    monitoring = container.ensure_monitoring()
    assert set(monitoring) == {"prometheus", "alertmanager"}
    path, ports = _compose_file(tmp_path)
    project = f"fidestest{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "FIDES_API_KEYS": USER_KEY,
        "FIDES_ADMIN_API_KEYS": ADMIN_KEY,
        "GRAFANA_ADMIN_PASSWORD": "unused",
    }
    base = [compose_cli, "-f", str(path), "-p", project, "--project-directory", str(DEPLOY)]

    def compose(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )

    gateway = f"http://127.0.0.1:{ports['gateway:8000']}"
    prometheus = f"http://127.0.0.1:{ports['prometheus:9090']}"
    alertmanager = f"http://127.0.0.1:{ports['alertmanager:9093']}"
    try:
        up = compose("up", "-d", "--no-build")
        assert up.returncode == 0, up.stderr[-3000:]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(gateway + "/v2/health/ready").status_code == 200:
                    break
            time.sleep(1)
        else:
            pytest.fail(f"gateway not ready\n{compose('logs', '--tail', '40').stdout[-4000:]}")

        def rules_loaded() -> bool:
            groups = httpx.get(prometheus + "/api/v1/rules").json()["data"]["groups"]
            return any(r["name"] == "FidesAttackDetected" for g in groups for r in g["rules"])

        def target_up() -> bool:
            targets = httpx.get(prometheus + "/api/v1/targets").json()["data"]["activeTargets"]
            return any(
                t["labels"]["job"] == "fides-gateway" and t["health"] == "up" for t in targets
            )

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, KeyError):
                if rules_loaded() and target_up():
                    break
            time.sleep(2)
        else:
            pytest.fail("Prometheus did not load the rules and scrape the gateway over the network")

        x = image_digits.take(8, seed=5)
        headers = {"X-API-Key": USER_KEY}
        with httpx.Client(base_url=gateway, headers=headers, timeout=30) as client:
            r = client.put(
                "/v2/admin/models/digits/drill",
                json={"attack": "switch", "rate": 1.0},
                headers={"X-API-Key": ADMIN_KEY},
            )
            assert r.status_code == 200, r.text
            drill_at = time.monotonic()
            delivered = None
            while time.monotonic() - drill_at < ALERT_TIMEOUT_S:
                for i in range(len(x)):
                    infer(client, x[i : i + 1])
                alerts = httpx.get(alertmanager + "/api/v2/alerts").json()
                delivered = next(
                    (a for a in alerts if a["labels"].get("alertname") == "FidesAttackDetected"),
                    None,
                )
                if delivered:
                    break
                time.sleep(2)
        latency = time.monotonic() - drill_at
        assert delivered is not None, (
            f"FidesAttackDetected did not reach Alertmanager in {ALERT_TIMEOUT_S} s\n"
            + compose("logs", "--tail", "30", "prometheus", "gateway").stdout[-4000:]
        )
        assert delivered["labels"]["model"] == "digits"
        print(f"\nFidesAttackDetected in Alertmanager {latency:.0f} s after the drill started")
    finally:
        down = compose("down", "-v", "--remove-orphans", "--timeout", "20")
        left = docker("ps", "-a", "--filter", f"label=com.docker.compose.project={project}", "-q")
        assert down.returncode == 0, down.stderr[-2000:]
        assert not left, f"containers left behind: {left}"
