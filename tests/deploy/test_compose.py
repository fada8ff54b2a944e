"""deploy/compose.yaml: valid against the Compose specification, files it names exist, and
the enclave is isolated as documented (no network, only the socket volume shared)."""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import DEPLOY

COMPOSE_FILES = ["compose.yaml", "compose.gpu.yaml"]
FIDES_SERVICES = ("enclave-init", "enclave", "gateway")


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / name).read_text(encoding="utf-8"))
    return data


def _compose_schema() -> dict[str, Any]:
    text = (files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _volumes(service: dict[str, Any]) -> dict[str, str]:
    """source -> target of a service's short-syntax volumes."""
    return {v.split(":")[0]: v.split(":")[1] for v in service.get("volumes", [])}


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_the_compose_spec(name: str) -> None:
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(_load(name))]
    assert not errors


def test_compose_schema_rejects_a_typo() -> None:
    schema = _compose_schema()
    broken = _load("compose.yaml")
    broken["services"]["gateway"]["enviroment"] = {"FIDES_PORT": "8000"}
    with pytest.raises(jsonschema.ValidationError, match="enviroment"):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_references_only_files_that_exist(name: str) -> None:
    doc = _load(name)
    checked = 0
    for service_name, service in doc["services"].items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context.is_dir(), service_name
            assert (context / build["dockerfile"]).is_file(), service_name
            checked += 1
        for source in _volumes(service):
            if source.startswith((".", "/")):  # a bind mount, not a named volume
                assert (DEPLOY / source).exists(), f"{service_name}: {source} does not exist"
                checked += 1
            else:
                assert source in _load("compose.yaml")["volumes"], f"undeclared volume {source}"
        for env_file in service.get("env_file", []):
            assert (DEPLOY / env_file).is_file(), env_file
    assert checked >= 3


def test_enclave_has_no_network_and_shares_only_the_socket() -> None:
    services = _load("compose.yaml")["services"]
    enclave, gateway = services["enclave"], services["gateway"]
    assert enclave["network_mode"] == "none"
    assert services["enclave-init"]["network_mode"] == "none"
    assert "ports" not in enclave
    shared = set(_volumes(enclave)) & set(_volumes(gateway))
    assert shared == {"enclave-socket"}
    socket_dir = _volumes(enclave)["enclave-socket"]
    command = enclave["command"]
    socket_path = command[command.index("--socket") + 1]
    assert Path(socket_path).parent == Path(socket_dir)
    assert _volumes(gateway)["enclave-socket"] == socket_dir
    # the gateway attaches to <runtime dir>/<model>.sock instead of starting an enclave
    env = gateway["environment"]
    assert env["FIDES_ENCLAVE_EXTERNAL"] == "1"
    assert Path(socket_path) == Path(env["FIDES_ENCLAVE_RUNTIME_DIR"]) / "digits.sock"
    assert env["FIDES_ENCLAVE_ALLOW_SIMULATED"] == "1"
    assert env["FIDES_ENCLAVE_INIT_PLATFORM"] == "0"
    # the gateway gets the public root certificate only, read-only, never the platform keys
    assert "enclave-platform" not in _volumes(gateway)
    assert any(v.startswith("enclave-trust:") and v.endswith(":ro") for v in gateway["volumes"])
    assert _volumes(gateway)["enclave-trust"] == env["FIDES_ENCLAVE_PLATFORM_DIR"]


def test_fides_services_are_hardened() -> None:
    services = _load("compose.yaml")["services"]
    for name in FIDES_SERVICES:
        service = services[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert service["user"] == "10001:10001", name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["image"].startswith("fides-gateway:"), name


def test_secrets_must_be_given_and_ports_stay_on_loopback() -> None:
    doc = _load("compose.yaml")
    gateway_env = doc["services"]["gateway"]["environment"]
    assert re.fullmatch(r"\$\{FIDES_API_KEYS:\?.+\}", gateway_env["FIDES_API_KEYS"])
    assert "FIDES_DEV_MODE" not in gateway_env
    grafana_env = doc["services"]["grafana"]["environment"]
    assert re.fullmatch(
        r"\$\{GRAFANA_ADMIN_PASSWORD:\?.+\}", grafana_env["GF_SECURITY_ADMIN_PASSWORD"]
    )
    for name, service in doc["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_third_party_images_are_pinned() -> None:
    for name, service in _load("compose.yaml")["services"].items():
        if name in FIDES_SERVICES:
            continue
        image = service["image"]
        assert re.fullmatch(r"[a-z0-9./-]+:v?\d+\.\d+\.\d+", image), f"{name}: pin {image}"


def test_gpu_override_reserves_a_gpu_and_builds_the_gpu_variant() -> None:
    services = _load("compose.gpu.yaml")["services"]
    gateway = services["gateway"]
    (device,) = gateway["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    for name in FIDES_SERVICES:
        assert services[name]["build"]["args"]["VARIANT"] == "gpu"
