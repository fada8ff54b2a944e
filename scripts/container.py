#!/usr/bin/env python3
"""Build and run Fides Gateway's images with a local Docker engine, also on a machine that
reaches its package registries (PyPI, Debian's mirror) but no container registry.

    python3 scripts/container.py base        # deploy/Dockerfile's base image: pulled, else made
    python3 scripts/container.py build       # the base, then the gateway image fides-gateway:cpu
    python3 scripts/container.py monitoring  # the Prometheus and Alertmanager images of compose
    python3 scripts/container.py run         # the gateway, hardened as docs/deploy.md says

Where a registry answers, `base` and `monitoring` pull the images deploy/Dockerfile and
deploy/compose.yaml name, and `build` is a plain `docker build`. Where none does:

- `base` makes ``python:3.11-slim-bookworm`` from Debian's packages: ``debootstrap --variant=
  minbase`` from the machine's apt mirror, imported into the engine, then
  deploy/local-images/python.Dockerfile adds Python 3.11 and the certificate authorities the
  machine trusts (/usr/local/share/ca-certificates: a package proxy's CA, without which pip
  cannot reach PyPI from inside a container);
- `build` passes the machine's pip sources to the build as ``PIP_*`` build arguments, serving
  local ones (``file://`` indexes, find-links folders) over HTTP on 127.0.0.1 for the length of
  the build (``--network host``), and takes torch from them when the CPU wheel index is out of
  reach (a ``+cpu`` wheel among them; otherwise PyPI's torch, the CUDA build, says a warning);
- `monitoring` builds Prometheus and Alertmanager from Debian's packages on that base
  (deploy/local-images/) and tags them with the names compose.yaml uses.

Only the standard library: it runs before any virtual environment exists. The Docker CLI is
``$FIDES_DOCKER``, else the first ``docker`` that can build with BuildKit (with buildx, or an
engine-bundled CLI older than 23, which has BuildKit built in).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
LOCAL_IMAGES = DEPLOY / "local-images"
GATEWAY_IMAGE = "fides-gateway:cpu"
ROOTFS_IMAGE = "fides-local/debian-minbase:bookworm"
CA_DIR = Path("/usr/local/share/ca-certificates")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


class ContainerError(RuntimeError):
    """A step that cannot go on, with what to do about it."""


def log(message: str) -> None:
    print(f"[container] {message}", file=sys.stderr, flush=True)


# -- the engine ---------------------------------------------------------------------------------


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, capture_output=True, check=False, **kw)  # type: ignore[call-overload, no-any-return]


@functools.cache
def docker() -> str:
    """The Docker CLI to use (see the module docstring)."""
    if os.environ.get("FIDES_DOCKER"):
        return os.environ["FIDES_DOCKER"]
    candidates = [c for c in (shutil.which("docker"), "/usr/bin/docker") if c and Path(c).exists()]
    for cli in dict.fromkeys(candidates):
        if _run([cli, "buildx", "version"]).returncode == 0:
            return cli
        version = _run([cli, "version", "--format", "{{.Client.Version}}"]).stdout.strip()
        major = re.match(r"(\d+)\.", version)
        if major and int(major.group(1)) < 23:
            return cli
    raise ContainerError(
        "no Docker CLI that can build with BuildKit: install buildx, or Debian's docker.io "
        "(/usr/bin/docker), or set FIDES_DOCKER"
    )


def engine_problem() -> str | None:
    """Why no container can run here, or None when an engine answers."""
    try:
        cli = docker()
    except ContainerError as exc:
        return str(exc)
    info = _run([cli, "info", "--format", "{{.ServerVersion}}"])
    if info.returncode != 0 or not info.stdout.strip():
        why = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"the Docker engine does not answer ({why}); start dockerd"
    return None


def image_exists(name: str) -> bool:
    return _run([docker(), "image", "inspect", name]).returncode == 0


def try_pull(name: str, timeout_s: float = 180) -> bool:
    try:
        return _run([docker(), "pull", name], timeout=timeout_s).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def image_size_mb(name: str) -> float:
    out = _run([docker(), "image", "inspect", "--format", "{{.Size}}", name])
    return int(out.stdout.strip() or 0) / 1e6


def docker_build(args: list[str], context: Path) -> None:
    cmd = [docker(), "build", *args, str(context)]
    log(" ".join(cmd))
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    done = subprocess.run(cmd, env=env, check=False)
    if done.returncode != 0:
        raise ContainerError(f"docker build failed (exit {done.returncode}): {' '.join(cmd)}")


# -- the base image -----------------------------------------------------------------------------


def base_image() -> str:
    """The image deploy/Dockerfile builds FROM, with its default build arguments."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.MULTILINE))
    return f"python:{args['PYTHON_VERSION']}-slim-{args['DEBIAN_RELEASE']}"


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses ($FIDES_DEBIAN_MIRROR first)."""
    if os.environ.get("FIDES_DEBIAN_MIRROR"):
        return os.environ["FIDES_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        with contextlib.suppress(OSError):
            text = path.read_text(encoding="utf-8")
            for url in re.findall(r"^(?:URIs:|deb)\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.MULTILINE):
                if "security" not in url:
                    return str(url)
    return "http://deb.debian.org/debian"


def ensure_base() -> str:
    name = base_image()
    if image_exists(name):
        log(f"base image {name}: present")
        return name
    if try_pull(name):
        log(f"base image {name}: pulled")
        return name
    if shutil.which("debootstrap") is None:
        raise ContainerError(
            f"{name} cannot be pulled and debootstrap is missing to make it (apt-get install "
            "debootstrap)"
        )
    release = name.rsplit("-", 1)[1]
    mirror = apt_mirror()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fides-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"{name} cannot be pulled: debootstrap --variant=minbase {release} from {mirror}")
        done = _run(["debootstrap", "--variant=minbase", release, str(rootfs), mirror])
        if done.returncode != 0:
            raise ContainerError(f"debootstrap failed: {done.stderr.strip()[-500:]}")
        with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            imported = subprocess.run(
                [docker(), "import", "-", ROOTFS_IMAGE], stdin=tar.stdout, capture_output=True
            )
        if imported.returncode != 0 or tar.returncode != 0:
            raise ContainerError(f"docker import failed: {imported.stderr.decode()[-500:]}")
        context = Path(tmp) / "context"
        (context / "ca").mkdir(parents=True)
        for crt in sorted(CA_DIR.rglob("*.crt")) if CA_DIR.is_dir() else []:
            shutil.copy(crt, context / "ca" / crt.name)
        shutil.copy(LOCAL_IMAGES / "python.Dockerfile", context / "Dockerfile")
        docker_build(["--build-arg", f"ROOTFS_IMAGE={ROOTFS_IMAGE}", "-t", name], context)
    log(f"base image {name}: made locally in {time.monotonic() - t0:.0f} s")
    return name


# -- pip sources --------------------------------------------------------------------------------


def pip_config() -> dict[str, str]:
    """pip's configuration as pip sees it (files, then PIP_* variables): key -> value."""
    out = _run([sys.executable, "-m", "pip", "config", "list"])
    config: dict[str, str] = {}
    for line in out.stdout.splitlines():
        m = re.match(r"[^.]+\.([\w-]+)='(.*)'$", line)
        if m:
            config[m.group(1)] = m.group(2)
    for key in ("index-url", "extra-index-url", "find-links", "trusted-host"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            config[key] = env
    return config


class _Sources(http.server.SimpleHTTPRequestHandler):
    """Files under one folder, nothing outside it (``..`` included)."""

    root = Path("/nonexistent")

    def translate_path(self, path: str) -> str:
        rel = urllib.request.url2pathname(path.split("?")[0].split("#")[0]).lstrip("/")
        target = (self.root / rel).resolve()
        return str(target) if target.is_relative_to(self.root) else "/nonexistent"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> http.server.ThreadingHTTPServer:
    """On a fixed port where it is free: the sources' URLs are build arguments, and a build
    argument that changes invalidates the cache of every RUN after it (a random port would
    rebuild every layer every time)."""
    port = int(os.environ.get("FIDES_PIP_SOURCES_PORT", "38765"))
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        log(f"port {port} is taken: another one (the build's pip layers are rebuilt)")
        return http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)


@contextlib.contextmanager
def pip_build_args() -> Iterator[list[str]]:
    """``--build-arg PIP_*=...`` for this machine's pip sources; local folders are served on
    127.0.0.1 while the context is open (the build runs with ``--network host``)."""
    config = pip_config()
    sources = {
        key: config[key].split()
        for key in ("index-url", "extra-index-url", "find-links")
        if config.get(key)
    }
    local = [
        Path(s.removeprefix("file://")).resolve()
        for values in sources.values()
        for s in values
        if not s.startswith(("http://", "https://"))
    ]
    server = None
    if local:
        # one folder above them all: an index's pages link to its files with ../../files/...
        root = Path(os.path.commonpath([p.parent for p in local]))
        handler = type("Sources", (_Sources,), {"root": root})
        server = _serve(handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        log(f"serving the local pip sources under {root} on 127.0.0.1:{server.server_port}")

    def url(source: str) -> str:
        if source.startswith(("http://", "https://")) or server is None:
            return source
        path = Path(source.removeprefix("file://")).resolve()
        return f"http://127.0.0.1:{server.server_port}/{path.relative_to(root)}/"

    values = {key: " ".join(url(s) for s in v) for key, v in sources.items()}
    args: list[str] = []
    for key, value in values.items():
        args += ["--build-arg", f"PIP_{key.upper().replace('-', '_')}={value}"]
    if config.get("trusted-host"):
        args += ["--build-arg", f"PIP_TRUSTED_HOST={config['trusted-host']}"]
    if not _reachable(TORCH_CPU_INDEX + "/"):
        index = values.get("index-url", "https://pypi.org/simple")
        has_cpu = any(any(p.glob("torch-*+cpu-*.whl")) for p in local if p.is_dir())
        log(
            f"{TORCH_CPU_INDEX} is out of reach: torch comes from {index}"
            + (" and the local +cpu wheel" if has_cpu else "")
        )
        if not has_cpu:
            log("warning: no local +cpu torch wheel: PyPI's torch is the CUDA build (several GB)")
        args += ["--build-arg", f"TORCH_INDEX_CPU={index}"]
    try:
        yield args
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


@functools.cache
def _reachable(url: str, timeout_s: float = 10) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s)
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


# -- the images ---------------------------------------------------------------------------------


def build_gateway(tag: str = GATEWAY_IMAGE, extra: list[str] | None = None) -> float:
    """Build deploy/Dockerfile as ``tag``; returns the build's wall seconds."""
    ensure_base()
    t0 = time.monotonic()
    with pip_build_args() as pip_args:
        args = ["--network", "host", "-f", str(DEPLOY / "Dockerfile"), "-t", tag]
        docker_build([*args, *pip_args, *(extra or [])], ROOT)
    wall = time.monotonic() - t0
    log(f"{tag}: built in {wall:.0f} s, {image_size_mb(tag):.0f} MB")
    return wall


def compose_images() -> dict[str, str]:
    """service -> image for compose.yaml's third-party services."""
    text = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    found = re.findall(r"^  ([\w-]+):\n(?:    .*\n)*?    image: (\S+)$", text, re.MULTILINE)
    return {service: image for service, image in found if "fides" not in image}


def ensure_monitoring() -> dict[str, str]:
    """Prometheus and Alertmanager images under compose.yaml's names: present, pulled, or
    built from Debian's packages (labelled io.fides.built-from=debian-package)."""
    images = compose_images()
    made: dict[str, str] = {}
    for service in ("prometheus", "alertmanager"):
        name = images[service]
        if image_exists(name) or try_pull(name):
            made[service] = name
            continue
        base = ensure_base()
        with tempfile.TemporaryDirectory(prefix=f"fides-{service}-") as tmp:
            shutil.copy(LOCAL_IMAGES / f"{service}.Dockerfile", Path(tmp) / "Dockerfile")
            docker_build(
                [
                    "--build-arg",
                    f"BASE={base}",
                    "--label",
                    "io.fides.built-from=debian",
                    "-t",
                    name,
                ],
                Path(tmp),
            )
        log(f"{name}: built from Debian's package (not the upstream image of that tag)")
        made[service] = name
    return made


def hardened_run_args(
    name: str,
    environment: dict[str, str],
    volumes: dict[str, str] | None = None,
    publish: str = "127.0.0.1::8000",
) -> list[str]:
    """``docker run`` arguments for the gateway as docs/deploy.md runs it: a read-only root, no
    capabilities, no new privileges, tmpfs for /tmp and the enclave's sockets, named volumes for
    the enclave platform and the alarm state (``volumes``: volume -> mount point)."""
    volumes = volumes or {
        f"{name}-platform": "/var/lib/fides/enclave-platform",
        f"{name}-alarm": "/var/lib/fides/alarm",
    }
    args = [
        "--name", name,
        "--read-only",
        "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        "--tmpfs", "/tmp",
        "--tmpfs", "/run/fides:uid=10001,gid=10001,mode=0700",
        "-p", publish,
    ]  # fmt: skip
    for volume, target in volumes.items():
        args += ["-v", f"{volume}:{target}"]
    for key, value in environment.items():
        args += ["-e", f"{key}={value}"]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("base", help="the Dockerfile's base image: present, pulled, or made locally")
    build = sub.add_parser("build", help="the base, then the gateway image")
    build.add_argument("--tag", default=GATEWAY_IMAGE)
    build.add_argument("docker_args", nargs="*", help="more `docker build` arguments (after --)")
    sub.add_parser("monitoring", help="Prometheus and Alertmanager images for compose.yaml")
    run = sub.add_parser("run", help="the gateway image, hardened; FIDES_* from the environment")
    run.add_argument("--tag", default=GATEWAY_IMAGE)
    run.add_argument("--port", type=int, default=8000, help="host port on 127.0.0.1")
    args = parser.parse_args(argv)
    try:
        problem = engine_problem()
        if problem:
            raise ContainerError(problem)
        if args.command == "base":
            ensure_base()
        elif args.command == "build":
            build_gateway(args.tag, args.docker_args)
        elif args.command == "monitoring":
            print(json.dumps(ensure_monitoring(), indent=2))
        else:
            env = {k: v for k, v in os.environ.items() if k.startswith("FIDES_")}
            run_args = hardened_run_args(
                "fides-gateway", env, publish=f"127.0.0.1:{args.port}:8000"
            )
            cmd = [docker(), "run", "--rm", *run_args, args.tag]
            log(
                " ".join(
                    c if not c.startswith("FIDES_API") else c.split("=")[0] + "=***" for c in cmd
                )
            )
            return subprocess.call(cmd)
    except ContainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
