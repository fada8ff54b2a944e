"""The Helm chart, checked without a cluster: `helm lint` (strict: warnings fail), renders of
the default values and of every toggle through the Helm 4 library (helm-sdkpy) into a fake API
server, every rendered object validated against the Kubernetes JSON schemas, the
PrometheusRule proven equal to deploy/prometheus/alerts.yml, and values.schema.json."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from scripts.sync_deploy_files import COPIES, drifted
from tests.deploy.conftest import CHART, DEPLOY
from tests.deploy.helm_tool import HelmUnavailable, run_helm
from tests.deploy.metric_names import exported_series_names

KUBE_VERSIONS = ("1.26.0", kubernetes_validate.latest_version())
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
CUSTOM_RELEASE = "monitoring-stack"

# values for renders; each toggle on by itself, and everything on at once
RENDERS: dict[str, dict[str, Any]] = {
    "default": {},
    "no_grpc": {"gateway": {"grpcPort": 0}},
    "service_monitor": {"metrics": {"serviceMonitor": {"enabled": True}}},
    "prometheus_rule": {"metrics": {"prometheusRule": {"enabled": True}}},
    "custom_release": {
        "metrics": {
            "prometheusRelease": CUSTOM_RELEASE,
            "serviceMonitor": {"enabled": True, "namespace": "monitoring"},
            "prometheusRule": {"enabled": True, "namespace": "monitoring"},
        }
    },
    "dashboard": {"metrics": {"grafanaDashboard": {"enabled": True}}},
    "hpa_cpu": {"autoscaling": {"enabled": True}},
    "hpa_queue": {"autoscaling": {"enabled": True, "queueDepth": {"enabled": True}}},
    "gpu": {"gpu": {"enabled": True}},
    "pvc": {"modelRepository": {"source": "pvc", "pvc": {"claimName": "models"}}},
    "init_container": {
        "modelRepository": {
            "source": "initContainer",
            "initContainer": {"image": "busybox:1.36", "command": ["sh", "-c", "true"]},
        }
    },
    "no_enclave": {"enclave": {"enabled": False}},
    "platform_secret": {"enclave": {"platform": {"existingSecret": "fides-platform"}}},
    "sealed_offline": {
        "enclave": {
            "models": [{"name": "digits", "sealedModel": "/models/digits/1/verifier.sealed"}]
        },
        "modelRepository": {"source": "pvc", "pvc": {"claimName": "models"}},
    },
    "two_models": {
        "enclave": {
            "models": [
                {"name": "digits", "sealModel": "/opt/fides/model_repository/v/1/model.onnx"},
                {"name": "digits_heavy", "sealModel": "/opt/fides/model_repository/w/1/model.onnx"},
            ]
        }
    },
    "user_keys": {
        "apiKeys": {"userKeys": ["user-key-0123456789"], "adminKeys": ["admin-key-0123456789"]}
    },
    "existing_keys": {"apiKeys": {"existingSecret": "my-keys", "existingSecretHasAdminKeys": True}},
    "restricted_ingress": {
        "networkPolicy": {
            "ingressFrom": [{"podSelector": {"matchLabels": {"role": "client"}}}],
            "egressTo": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
        }
    },
    "open_egress": {"networkPolicy": {"restrictEgress": False}},
    "no_pdb_no_netpol": {
        "podDisruptionBudget": {"enabled": False},
        "networkPolicy": {"enabled": False},
    },
    "alarm_claim_per_pod": {
        "alarmState": {"persistence": {"enabled": True, "storageClassName": "fast"}},
        "autoscaling": {"enabled": True},
    },
    "alarm_shared_claim": {
        "alarmState": {"existingClaim": "alarm-state", "existingClaimReadWriteMany": True}
    },
    "alarm_claim_one_pod": {"replicaCount": 1, "alarmState": {"existingClaim": "alarm-state"}},
    "alarm_state_1gi_two_models": {
        "alarmState": {"sizeLimit": "1Gi"},
        "enclave": {
            "models": [
                {"name": "digits", "sealModel": "/opt/fides/model_repository/v/1/model.onnx"},
                {"name": "digits_heavy", "sealModel": "/opt/fides/model_repository/w/1/model.onnx"},
            ]
        },
    },
    "incidents_bound_set": {
        "gateway": {"env": [{"name": "FIDES_INTEGRITY_INCIDENTS_MAX_MB", "value": "10"}]}
    },
    "all_on": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "authorization": {"name": "k", "key": "key"}},
            "prometheusRule": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
        },
        "autoscaling": {"enabled": True, "queueDepth": {"enabled": True}},
        "gpu": {"enabled": True},
        "gateway": {
            "metricsRequireAuth": True,
            "env": [{"name": "FIDES_LOG_LEVEL", "value": "DEBUG"}],
        },
        "enclave": {
            "platform": {"existingSecret": "fides-platform"},
            "models": [
                {
                    "name": "digits",
                    "sealModel": "/models/digits_verifier/1/model.onnx",
                    "args": ["--transition-us", "5"],
                }
            ],
        },
        "modelRepository": {"source": "pvc", "pvc": {"claimName": "models", "subPath": "repo"}},
    },
}
# values Helm must refuse: (values, text expected in the error)
BROKEN: dict[str, tuple[dict[str, Any], str]] = {
    "typo": ({"autoscalling": {"enabled": True}}, "autoscalling"),
    "bad_source": ({"modelRepository": {"source": "s3"}}, "source"),
    "root_user": ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
    "pvc_without_claim": ({"modelRepository": {"source": "pvc"}}, "claimName"),
    "nothing_to_seal": ({"enclave": {"models": [{"name": "digits"}]}}, "needs sealModel"),
    "no_enclave_models": ({"enclave": {"models": []}}, "at least one entry"),
    # the reviewer's set-up: two replicas on one ReadWriteOnce claim at the same path
    "alarm_claim_shared_rwo": (
        {"alarmState": {"existingClaim": "alarm-state"}},
        "it must be ReadWriteMany",
    ),
    "alarm_claim_rwo_hpa": (
        {"replicaCount": 1, "autoscaling": {"enabled": True}, "alarmState": {"existingClaim": "a"}},
        "up to 10 here",
    ),
    "alarm_two_claims": (
        {"alarmState": {"existingClaim": "a", "persistence": {"enabled": True}}},
        "not both",
    ),
    # no room for the incident bundles beside the alarm states: refused, not evicted later
    "alarm_state_too_small_for_its_models": (
        {
            "enclave": {
                "models": [
                    {"name": f"m{i}", "sealModel": "/opt/fides/model_repository/v/1/model.onnx"}
                    for i in range(4)
                ]
            }
        },
        "leaves 0 MiB of incident bundles to each of the 4 verified model(s) (enclave.models)"
        " once 16 MiB of each one's share holds its alarm state (a full bundle is about 3 MB): "
        "give it at least 80Mi",
    ),
    "alarm_claim_too_small": (
        {"alarmState": {"persistence": {"enabled": True, "size": "16Mi"}}},
        "alarmState: 16Mi leaves 0 MiB",
    ),
}


@pytest.fixture(scope="module")
def helm() -> dict[str, Any]:
    """Lint and every render, in one child process (about a second)."""
    renders = {name: values for name, values in RENDERS.items()}
    renders.update({f"broken_{name}": values for name, (values, _) in BROKEN.items()})
    try:
        return run_helm({"chart": str(CHART), "lint": True, "renders": renders})
    except HelmUnavailable as exc:
        pytest.fail(f"{exc}: run `make deploy-tools` (helm-sdkpy)", pytrace=False)


def _objects(helm: dict[str, Any], name: str) -> list[dict[str, Any]]:
    render = helm["renders"][name]
    assert "error" not in render, render.get("error")
    return [doc for doc in yaml.safe_load_all(render["manifest"]) if doc]


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def _kinds(objects: list[dict[str, Any]]) -> set[str]:
    return {o["kind"] for o in objects}


def _workload(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The gateway's Deployment, or its StatefulSet (alarm state on a claim)."""
    (obj,) = [o for o in objects if o["kind"] in {"Deployment", "StatefulSet"}]
    return obj


def _containers(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    pod = _workload(objects)["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"] + pod.get("initContainers", [])}


def _pod_volumes(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    pod = _workload(objects)["spec"]["template"]["spec"]
    return {v["name"]: v for v in pod["volumes"]}


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# -- lint -------------------------------------------------------------------------------------


def test_helm_lint_strict(helm: dict[str, Any]) -> None:
    """`helm lint --strict` fails on warnings: so does this (helm-sdkpy loses the texts)."""
    problems = [m for m in helm["lint"] if m["severity"] not in {"INFO"}]
    assert not problems


@pytest.mark.parametrize("name", ["all_on", "alarm_claim_per_pod"])
def test_helm_lint_strict_with_every_toggle_on(tmp_path: Path, name: str) -> None:
    """Lint reads the chart's own values.yaml: lint a copy whose values turn everything on
    (and one whose gateway is a StatefulSet)."""
    chart = tmp_path / "fides-gateway"
    shutil.copytree(CHART, chart)
    values = yaml.safe_load((chart / "values.yaml").read_text(encoding="utf-8"))
    (chart / "values.yaml").write_text(yaml.safe_dump(_merge(values, RENDERS[name])))
    result = run_helm({"chart": str(chart), "lint": True})
    assert [m for m in result["lint"] if m["severity"] != "INFO"] == []


def test_helm_lint_catches_a_broken_template(tmp_path: Path) -> None:
    chart = tmp_path / "fides-gateway"
    shutil.copytree(CHART, chart)
    service = chart / "templates" / "service.yaml"
    service.write_text(service.read_text(encoding="utf-8").replace("ports:", "ports: [", 1))
    result = run_helm({"chart": str(chart), "lint": True})
    assert {"severity": "ERROR", "path": "templates/service.yaml"} in result["lint"]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# -- every render is valid Kubernetes ---------------------------------------------------------


@pytest.mark.parametrize("name", list(RENDERS))
def test_render_is_valid_kubernetes(helm: dict[str, Any], name: str) -> None:
    objects = _objects(helm, name)
    assert {"Deployment", "StatefulSet"} & _kinds(objects)
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {obj['kind']} invalid for Kubernetes {version}: {exc}")


@pytest.mark.parametrize("name", list(BROKEN))
def test_helm_refuses_broken_values(helm: dict[str, Any], name: str) -> None:
    _, expected = BROKEN[name]
    render = helm["renders"][f"broken_{name}"]
    assert "manifest" not in render
    assert expected in render["error"]


# -- what the default values deploy -----------------------------------------------------------


def test_default_objects(helm: dict[str, Any]) -> None:
    objects = _objects(helm, "default")
    assert _kinds(objects) == {
        "Deployment",
        "Service",
        "ServiceAccount",
        "Secret",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    deployment = _one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    # a key is generated when none is given; the gateway reads it from the mounted Secret
    secret = _one(objects, "Secret")
    assert set(secret["data"]) == {"api-keys"}
    gateway = _containers(objects)["gateway"]
    assert _env(gateway)["FIDES_API_KEY_FILE"] == "/etc/fides/api-keys/api-keys"
    assert "FIDES_DEV_MODE" not in _env(gateway)


def test_probes_as_tritons_chart(helm: dict[str, Any]) -> None:
    gateway = _containers(_objects(helm, "default"))["gateway"]
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    startup = gateway["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    # model loading and the enclave boot get periodSeconds * failureThreshold = 300 s
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("name", ["default", "all_on", "init_container", "alarm_claim_per_pod"])
def test_every_container_is_locked_down(helm: dict[str, Any], name: str) -> None:
    for cname, container in _containers(_objects(helm, name)).items():
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, cname
        assert sc["allowPrivilegeEscalation"] is False, cname
        assert sc["capabilities"]["drop"] == ["ALL"], cname
        assert sc["runAsNonRoot"] is True, cname
        if cname != "model-repository":  # the user's own init container
            assert {"requests", "limits"} <= set(container["resources"]), cname


def test_enclave_sidecar_shares_only_the_socket(helm: dict[str, Any]) -> None:
    objects = _objects(helm, "platform_secret")
    containers = _containers(objects)
    gateway, enclave = containers["gateway"], containers["enclave-digits"]
    mounts = {c: {m["name"]: m for m in containers[c]["volumeMounts"]} for c in containers}
    # "tmp" is a scratch emptyDir per container mount point; nothing else is shared
    assert set(mounts["gateway"]) & set(mounts["enclave-digits"]) - {"tmp"} == {"enclave-socket"}
    volumes = _pod_volumes(objects)
    assert "emptyDir" in volumes["enclave-socket"]
    assert volumes["enclave-platform"]["emptyDir"]["medium"] == "Memory"
    assert "ports" not in enclave
    # the gateway attaches to <runtime dir>/<model>.sock, the sidecar's socket
    args = enclave["args"]
    socket_path = Path(args[args.index("--socket") + 1])
    env = _env(gateway)
    assert env["FIDES_ENCLAVE_EXTERNAL"] == "1"
    assert socket_path == Path(env["FIDES_ENCLAVE_RUNTIME_DIR"]) / "digits.sock"
    assert socket_path.parent == Path(mounts["gateway"]["enclave-socket"]["mountPath"])
    # the platform Secret reaches the init container only; the gateway pins root.pem from the
    # trust volume and never creates a platform itself
    assert "enclave-platform-source" in mounts["enclave-init-digits"]
    assert "enclave-platform-source" not in mounts["gateway"]
    assert "enclave-platform" not in mounts["gateway"]
    assert mounts["gateway"]["enclave-trust"]["readOnly"] is True
    assert env["FIDES_ENCLAVE_PLATFORM_DIR"] == mounts["gateway"]["enclave-trust"]["mountPath"]
    assert env["FIDES_ENCLAVE_INIT_PLATFORM"] == "0"
    assert _env(containers["enclave-init-digits"])["FIDES_ENCLAVE_PLATFORM_SOURCE"]
    # the sidecar is the simulation, so the gateway is told to accept simulated evidence
    assert env["FIDES_ENCLAVE_ALLOW_SIMULATED"] == "1"
    # sealed with the verifier config the gateway measures with (test_enclave_init.py)
    init_env = _env(containers["enclave-init-digits"])
    assert init_env["FIDES_ENCLAVE_SEAL_CONFIG"] == "/opt/fides/enclave/verifier.yaml"
    assert init_env["FIDES_ENCLAVE_SEALED_MODEL"] == args[args.index("--sealed-model") + 1]
    # ... against the model's own rollback counter (no counter shared between models)
    assert init_env["FIDES_ENCLAVE_SEAL_MODEL_NAME"] == "digits"


def test_one_enclave_sidecar_per_verified_model(helm: dict[str, Any]) -> None:
    containers = _containers(_objects(helm, "two_models"))
    assert {"enclave-digits", "enclave-digits-heavy"} <= set(containers)
    assert {"enclave-init-digits", "enclave-init-digits-heavy"} <= set(containers)
    for model in ("digits", "digits_heavy"):
        init = containers["enclave-init-" + model.replace("_", "-")]
        assert _env(init)["FIDES_ENCLAVE_SEAL_MODEL_NAME"] == model
    sockets = set()
    for name in ("enclave-digits", "enclave-digits-heavy"):
        args = containers[name]["args"]
        sockets.add(args[args.index("--socket") + 1])
    assert sockets == {"/run/fides/digits.sock", "/run/fides/digits_heavy.sock"}


def test_without_the_enclave(helm: dict[str, Any]) -> None:
    objects = _objects(helm, "no_enclave")
    containers = _containers(objects)
    assert set(containers) == {"gateway"}
    assert not any(k.startswith("FIDES_ENCLAVE") for k in _env(containers["gateway"]))


# -- monitoring -------------------------------------------------------------------------------


def test_chart_copies_match_deploy_sources() -> None:
    """One source of truth: the chart's embedded files are the deploy/ files, byte for byte."""
    assert drifted() == [], "run `make sync-deploy`"
    assert {src.relative_to(DEPLOY).as_posix() for src in COPIES} == {
        "prometheus/alerts.yml",
        "grafana/dashboards/fides-gateway.json",
    }


def test_prometheus_rule_is_alerts_yml(helm: dict[str, Any]) -> None:
    rule = _one(_objects(helm, "prometheus_rule"), "PrometheusRule")
    source = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    assert rule["spec"]["groups"] == source["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_monitoring_objects_carry_the_configured_release_label(helm: dict[str, Any]) -> None:
    objects = _objects(helm, "custom_release")
    service = _one(objects, "Service")
    for kind in ("ServiceMonitor", "PrometheusRule"):
        obj = _one(objects, kind)
        assert obj["metadata"]["labels"]["release"] == CUSTOM_RELEASE
        assert obj["metadata"]["namespace"] == "monitoring"
    monitor = _one(objects, "ServiceMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["fides"]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]


def test_grafana_dashboard_configmap(helm: dict[str, Any]) -> None:
    config_map = _one(_objects(helm, "dashboard"), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = json.loads((DEPLOY / "grafana" / "dashboards" / "fides-gateway.json").read_text())
    assert json.loads(config_map["data"]["fides-gateway.json"]) == source


def test_service_monitor_authorization(helm: dict[str, Any]) -> None:
    objects = _objects(helm, "all_on")
    (endpoint,) = _one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "k", "key": "key"},
    }
    assert _env(_containers(objects)["gateway"])["FIDES_METRICS_REQUIRE_AUTH"] == "1"


# -- scaling, GPU, model repository, keys, network ---------------------------------------------


def test_hpa_on_cpu(helm: dict[str, Any]) -> None:
    objects = _objects(helm, "hpa_cpu")
    hpa = _one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == _one(objects, "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert "replicas" not in _one(objects, "Deployment")["spec"]  # the HPA owns it


def test_hpa_on_queue_depth(helm: dict[str, Any]) -> None:
    hpa = _one(_objects(helm, "hpa_queue"), "HorizontalPodAutoscaler")
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods == [
        {
            "metric": {"name": "fides_inference_queue_depth"},
            "target": {"type": "AverageValue", "averageValue": "8"},
        }
    ]
    assert "fides_inference_queue_depth" in exported_series_names()


def test_gpu_variant(helm: dict[str, Any]) -> None:
    objects = _objects(helm, "gpu")
    containers = _containers(objects)
    assert containers["gateway"]["image"].endswith("-gpu")
    assert containers["gateway"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in containers["enclave-digits"]["resources"]["limits"]
    tolerations = _one(objects, "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert _containers(_objects(helm, "default"))["gateway"]["image"].endswith("-cpu")


def test_model_repository_from_pvc(helm: dict[str, Any]) -> None:
    objects = _objects(helm, "all_on")
    volumes = _pod_volumes(objects)
    assert volumes["model-repository"]["persistentVolumeClaim"] == {
        "claimName": "models",
        "readOnly": True,
    }
    gateway = _containers(objects)["gateway"]
    (mount,) = [m for m in gateway["volumeMounts"] if m["name"] == "model-repository"]
    assert mount == {
        "name": "model-repository",
        "mountPath": "/models",
        "readOnly": True,
        "subPath": "repo",
    }
    assert _env(gateway)["FIDES_MODEL_REPOSITORY"] == "/models"


def test_model_repository_from_image_and_init_container(helm: dict[str, Any]) -> None:
    default = _containers(_objects(helm, "default"))["gateway"]
    assert _env(default)["FIDES_MODEL_REPOSITORY"] == "/opt/fides/model_repository"
    objects = _objects(helm, "init_container")
    containers = _containers(objects)
    init = containers["model-repository"]
    assert init["image"] == "busybox:1.36"
    assert {"name": "model-repository", "mountPath": "/models"} in init["volumeMounts"]
    volumes = _pod_volumes(objects)
    assert "emptyDir" in volumes["model-repository"]
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    # models first, then the enclave init that may seal a verifier from them
    assert [c["name"] for c in pod["initContainers"]] == ["model-repository", "enclave-init-digits"]


def test_sealed_offline_boots_the_given_file(helm: dict[str, Any]) -> None:
    containers = _containers(_objects(helm, "sealed_offline"))
    args = containers["enclave-digits"]["args"]
    assert args[args.index("--sealed-model") + 1] == "/models/digits/1/verifier.sealed"
    assert "FIDES_ENCLAVE_SEAL_MODEL" not in _env(containers["enclave-init-digits"])
    mounts = containers["enclave-digits"]["volumeMounts"]
    assert any(m["name"] == "model-repository" for m in mounts)


def test_api_keys_from_values_and_from_an_existing_secret(helm: dict[str, Any]) -> None:
    import base64

    secret = _one(_objects(helm, "user_keys"), "Secret")
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == "user-key-0123456789"
    assert base64.b64decode(secret["data"]["admin-api-keys"]).decode() == "admin-key-0123456789"
    objects = _objects(helm, "existing_keys")
    assert "Secret" not in _kinds(objects)
    volumes = _pod_volumes(objects)
    assert volumes["api-keys"]["secret"]["secretName"] == "my-keys"
    env = _env(_containers(objects)["gateway"])
    assert env["FIDES_ADMIN_API_KEY_FILE"] == "/etc/fides/api-keys/admin-api-keys"


def test_grpc_port_on_by_default_and_off_with_zero(helm: dict[str, Any]) -> None:
    objects = _objects(helm, "default")
    gateway = _containers(objects)["gateway"]
    assert {"name": "grpc", "containerPort": 8001, "protocol": "TCP"} in gateway["ports"]
    assert _env(gateway)["FIDES_GRPC_PORT"] == "8001"
    service = _one(objects, "Service")["spec"]["ports"]
    assert {
        "name": "grpc",
        "port": 8001,
        "targetPort": "grpc",
        "protocol": "TCP",
        "appProtocol": "grpc",
    } in service
    off = _objects(helm, "no_grpc")
    gateway = _containers(off)["gateway"]
    assert [p["name"] for p in gateway["ports"]] == ["http"]
    assert _env(gateway)["FIDES_GRPC_ENABLED"] == "false"
    assert [p["name"] for p in _one(off, "Service")["spec"]["ports"]] == ["http"]
    (ingress,) = _one(off, "NetworkPolicy")["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_network_policy(helm: dict[str, Any]) -> None:
    default = _one(_objects(helm, "default"), "NetworkPolicy")["spec"]
    assert default["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = default["ingress"]
    # any caller, the gateway's two ports
    assert ingress == {
        "ports": [{"port": "http", "protocol": "TCP"}, {"port": "grpc", "protocol": "TCP"}]
    }
    assert [p["port"] for rule in default["egress"] for p in rule["ports"]] == [53, 53]  # DNS only
    restricted = _one(_objects(helm, "restricted_ingress"), "NetworkPolicy")["spec"]
    peers = restricted["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"role": "client"}}} in peers
    assert any("namespaceSelector" in p for p in peers)  # Prometheus may still scrape
    assert {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]} in restricted["egress"]
    assert _one(_objects(helm, "open_egress"), "NetworkPolicy")["spec"]["policyTypes"] == [
        "Ingress"
    ]
    assert not _kinds(_objects(helm, "no_pdb_no_netpol")) & {"NetworkPolicy", "PodDisruptionBudget"}


def test_pdb(helm: dict[str, Any]) -> None:
    objects = _objects(helm, "default")
    pdb = _one(objects, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["maxUnavailable"] == 1
    labels = _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# -- values.schema.json -----------------------------------------------------------------------


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text("utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def _defaults() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text("utf-8"))
    return values


def test_schema_accepts_the_defaults_and_every_render() -> None:
    schema = _schema()
    for name, values in RENDERS.items():
        errors = list(jsonschema.Draft7Validator(schema).iter_errors(_merge(_defaults(), values)))
        assert not errors, f"{name}: {[e.message for e in errors]}"


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"replicaCount": "two"}, "replicaCount"),
        ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
        ({"gateway": {"port": 70000}}, "port"),
        ({"gateway": {"logLevel": "LOUD"}}, "logLevel"),
        ({"apiKeys": {"userKeys": ["short"]}}, "userKeys"),
        ({"apiKeys": {"userKeys": ["has,a-comma-0123456789"]}}, "userKeys"),
        ({"securityContext": {"allowPrivilegeEscalation": True}}, "allowPrivilegeEscalation"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
        ({"modelRepository": {"source": "pvc"}}, "modelRepository"),
        ({"modelRepository": {"source": "initContainer"}}, "modelRepository"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "interval"),
        (
            {"autoscaling": {"targetCPUUtilizationPercentage": 150}},
            "targetCPUUtilizationPercentage",
        ),
        ({"gateway": {"resources": {"limits": {"cpu": "lots"}}}}, "cpu"),
        ({"networkPolicy": {"enabeld": True}}, "networkPolicy"),
    ],
)
def test_schema_rejects_broken_values(change: dict[str, Any], where: str) -> None:
    errors = list(jsonschema.Draft7Validator(_schema()).iter_errors(_merge(_defaults(), change)))
    assert errors
    assert any(where in "/".join(map(str, e.absolute_path)) + e.message for e in errors)


def test_templates_reference_only_keys_in_values_yaml() -> None:
    """What `helm lint --strict` catches by rendering with missingkey=error (helm-sdkpy's lint
    is not strict): every `.Values.a.b` path in a template exists in values.yaml."""
    defaults = _defaults()
    pattern = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
    checked = 0
    for template in (CHART / "templates").iterdir():
        for match in pattern.finditer(template.read_text(encoding="utf-8")):
            node: Any = defaults
            for key in match.group(1).strip(".").split("."):
                assert isinstance(node, dict), f"{template.name}: .Values{match.group(1)}"
                assert key in node, f"{template.name}: .Values{match.group(1)} not in values.yaml"
                node = node[key]
            checked += 1
    assert checked > 50


# -- the alarm state: one file per pod, a StatefulSet on a claim ------------------------------


def test_alarm_state_on_an_emptydir_by_default(helm: dict[str, Any]) -> None:
    objects = _objects(helm, "default")
    assert "StatefulSet" not in _kinds(objects)
    assert "emptyDir" in _pod_volumes(objects)["alarm-state"]


def test_alarm_state_on_a_claim_per_pod_is_a_statefulset(helm: dict[str, Any]) -> None:
    objects = _objects(helm, "alarm_claim_per_pod")
    assert "Deployment" not in _kinds(objects)
    sts = _one(objects, "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "alarm-state"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["storageClassName"] == "fast"
    pod = sts["spec"]["template"]["spec"]
    assert "alarm-state" not in {v["name"] for v in pod["volumes"]}  # the template's claim
    (gateway,) = [c for c in pod["containers"] if c["name"] == "gateway"]
    assert {"name": "alarm-state", "mountPath": "/var/lib/fides/alarm"} in gateway["volumeMounts"]
    headless = [o for o in objects if o["kind"] == "Service" and o["spec"].get("clusterIP")]
    assert [h["metadata"]["name"] for h in headless] == [sts["spec"]["serviceName"]]
    assert headless[0]["spec"]["clusterIP"] == "None"
    assert "replicas" not in sts["spec"]  # the HPA owns it, and scales the StatefulSet
    target = _one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", sts["metadata"]["name"])


def test_alarm_state_on_a_shared_claim_is_a_statefulset(helm: dict[str, Any]) -> None:
    for name in ("alarm_shared_claim", "alarm_claim_one_pod"):
        objects = _objects(helm, name)
        sts = _one(objects, "StatefulSet")
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert volumes["alarm-state"]["persistentVolumeClaim"] == {"claimName": "alarm-state"}
        assert "volumeClaimTemplates" not in sts["spec"]


# -- the incident bundles' byte bound fits the alarm state's volume ----------------------------

STATE_RESERVE_MIB = 16  # each verified model's alarm state (deployment.yaml; docs/deploy.md)
FULL_BUNDLE_MIB = 4  # a bundle of integrity.alarm_incident_requests (2048) requests, ~2.7 MB


def _mib(quantity: str) -> int:
    n, unit = int(quantity[:-2]), quantity[-2:]
    return {"Ki": n // 1024, "Mi": n, "Gi": n * 1024, "Ti": n * 1024 * 1024}[unit]


@pytest.mark.parametrize(
    ("name", "volume_mib", "models"),
    [
        ("default", 64, 1),
        ("two_models", 64, 2),
        ("alarm_state_1gi_two_models", 1024, 2),
        ("no_enclave", 64, 1),
        ("alarm_claim_per_pod", 1024, 1),
    ],
)
def test_incident_bound_fits_the_alarm_state_volume(
    helm: dict[str, Any], name: str, volume_mib: int, models: int
) -> None:
    """The gateway's bound on its incident bundles per verified model
    (FIDES_INTEGRITY_INCIDENTS_MAX_MB) is set from the volume the chart gives the alarm state
    (the emptyDir's sizeLimit, the kubelet evicts the pod past it; or each pod's claim): every
    model's bundles and its alarm state fit in it together, and a full bundle fits in each
    model's bound."""
    objects = _objects(helm, name)
    env = _env(_containers(objects)["gateway"])
    bound = int(env["FIDES_INTEGRITY_INCIDENTS_MAX_MB"])
    sts = [o for o in objects if o["kind"] == "StatefulSet"]
    if sts:
        (claim,) = sts[0]["spec"]["volumeClaimTemplates"]
        size = claim["spec"]["resources"]["requests"]["storage"]
    else:
        size = _pod_volumes(objects)["alarm-state"]["emptyDir"]["sizeLimit"]
    assert _mib(size) == volume_mib
    assert models * (bound + STATE_RESERVE_MIB) <= volume_mib
    assert bound >= FULL_BUNDLE_MIB
    assert bound == volume_mib // models - STATE_RESERVE_MIB  # all of what is left


def test_incident_bound_not_set_on_a_shared_claim_or_where_gateway_env_sets_it(
    helm: dict[str, Any],
) -> None:
    """A shared existingClaim's size is not in the values: the gateway's default applies
    (docs/deploy.md says how to size the claim). A bound in gateway.env is the only one."""
    for name in ("alarm_shared_claim", "alarm_claim_one_pod"):
        env = _env(_containers(_objects(helm, name))["gateway"])
        assert "FIDES_INTEGRITY_INCIDENTS_MAX_MB" not in env
    gateway = _containers(_objects(helm, "incidents_bound_set"))["gateway"]
    named = [e for e in gateway["env"] if e["name"] == "FIDES_INTEGRITY_INCIDENTS_MAX_MB"]
    assert named == [{"name": "FIDES_INTEGRITY_INCIDENTS_MAX_MB", "value": "10"}]
