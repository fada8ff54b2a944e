#!/usr/bin/env bash
# Tools the deployment checks in `make test` need (tests/deploy, tests/e2e/test_alerting.py),
# installed the way a user would:
#   promtool + amtool, and the prometheus and prometheus-alertmanager servers the alerting test
#                      starts: Debian's prometheus and prometheus-alertmanager packages
#                      (apt-get, as root), unless all four are already on PATH;
#   helm-sdkpy:        the Helm 4 library for Python, into the project's virtualenv, at an exact
#                      version. It declares Python >= 3.12 but runs on 3.11 (a cffi binding to a
#                      Go shared object), so pip-compile cannot put it in requirements.lock for
#                      3.11: it goes in with --ignore-requires-python --no-deps, and its cffi and
#                      pycparser come from the lock (CONSTRAINTS).
# Fails loudly with what to do when it cannot install something; never skips.
set -euo pipefail
PY="${1:?usage: install_deploy_tools.sh VENV_PYTHON CONSTRAINTS [PIP_FLAGS...]}"
CONSTRAINTS="${2:?usage: install_deploy_tools.sh VENV_PYTHON CONSTRAINTS [PIP_FLAGS...]}"
shift 2
PIP_FLAGS=("$@")  # e.g. -q
HELM_SDKPY_SPEC="${HELM_SDKPY_SPEC:-helm-sdkpy==0.1.32}"

MONITORING_TOOLS=(promtool amtool prometheus prometheus-alertmanager)
missing=()
for tool in "${MONITORING_TOOLS[@]}"; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing ${missing[*]} (apt-get: prometheus prometheus-alertmanager)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null
    else
        echo "error: ${missing[*]} missing; the deployment checks (tests/deploy) and the alerting" >&2
        echo "  test (tests/e2e/test_alerting.py) need promtool, amtool, prometheus and" >&2
        echo "  prometheus-alertmanager." >&2
        echo "  Debian/Ubuntu: sudo apt-get install prometheus prometheus-alertmanager" >&2
        echo "  elsewhere: put them on PATH from the Prometheus and Alertmanager releases" >&2
        echo "  (the Alertmanager binary under the name prometheus-alertmanager, as Debian has it)" >&2
        exit 1
    fi
fi
for tool in "${MONITORING_TOOLS[@]}"; do
    "$tool" --version >/dev/null 2>&1 || { echo "error: $tool --version failed" >&2; exit 1; }
done

if ! "$PY" -c "import helm_sdkpy" 2>/dev/null; then
    echo "==> installing $HELM_SDKPY_SPEC into the virtualenv"
    if "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
        "$PY" -m pip install "${PIP_FLAGS[@]}" -c "$CONSTRAINTS" "$HELM_SDKPY_SPEC"
    else
        "$PY" -m pip install "${PIP_FLAGS[@]}" -c "$CONSTRAINTS" cffi pycparser
        "$PY" -m pip install "${PIP_FLAGS[@]}" --ignore-requires-python --no-deps "$HELM_SDKPY_SPEC"
    fi
fi
if ! "$PY" -c "import helm_sdkpy, helm_sdkpy._ffi as f; f.get_library()"; then
    echo "error: helm-sdkpy is installed but its Helm library does not load here" >&2
    echo "  (it bundles a linux-amd64 build only)" >&2
    exit 1
fi
