#!/bin/sh
# Prepares the simulated enclave before it boots; run once per start, from the gateway image
# (installed as /usr/local/bin/fides-enclave-init), by the compose service `enclave-init` and by
# the Helm chart's init container. Everything comes from the environment:
#
#   FIDES_ENCLAVE_PLATFORM_DIR     writable platform directory the enclave boots from (required)
#   FIDES_ENCLAVE_PLATFORM_SOURCE  read-only copy of a platform made by `fides enclave init-ca`
#                                  (a mounted Kubernetes Secret); copied in with mode 0600.
#                                  Unset: an existing platform is kept, or a new one is created
#                                  (compose, development only).
#   FIDES_ENCLAVE_TRUST_DIR        where to put root.pem for the gateway to pin (optional); the
#                                  gateway never sees the platform keys or secret
#   FIDES_ENCLAVE_SEAL_MODEL       verifier ONNX to seal now (optional; else bring a sealed file)
#   FIDES_ENCLAVE_SEAL_CONFIG      its verifier config YAML (optional)
#   FIDES_ENCLAVE_SEALED_MODEL     the sealed file to write (required with SEAL_MODEL)
#   FIDES_ENCLAVE_SEAL_MODEL_NAME  the served model the file is for (optional, recommended):
#                                  sealed against that model's own rollback counter, as the
#                                  gateway seals; unset: the platform-wide counter, which every
#                                  file sealed without a name shares
set -eu

platform="${FIDES_ENCLAVE_PLATFORM_DIR:?set FIDES_ENCLAVE_PLATFORM_DIR}"
umask 077
mkdir -p "$platform"
chmod 0700 "$platform"

if [ -n "${FIDES_ENCLAVE_PLATFORM_SOURCE:-}" ]; then
    for name in root.pem root.key platform.pem platform.key platform_secret; do
        if [ -f "$FIDES_ENCLAVE_PLATFORM_SOURCE/$name" ]; then
            # cat, not cp: Secret volume files are symlinks with their own modes
            cat "$FIDES_ENCLAVE_PLATFORM_SOURCE/$name" > "$platform/$name"
            chmod 0600 "$platform/$name"
        fi
    done
    for name in root.pem platform.pem platform.key platform_secret; do
        [ -s "$platform/$name" ] || {
            echo "fides-enclave-init: $FIDES_ENCLAVE_PLATFORM_SOURCE has no $name" >&2
            exit 2
        }
    done
elif [ ! -f "$platform/root.pem" ]; then
    echo "fides-enclave-init: no platform given; creating a new SIMULATED one in $platform" >&2
    fides enclave init-ca --platform-dir "$platform"
fi

if [ -n "${FIDES_ENCLAVE_TRUST_DIR:-}" ]; then
    mkdir -p "$FIDES_ENCLAVE_TRUST_DIR"
    umask 022
    cat "$platform/root.pem" > "$FIDES_ENCLAVE_TRUST_DIR/root.pem"
    chmod 0644 "$FIDES_ENCLAVE_TRUST_DIR/root.pem"
    umask 077
fi

if [ -n "${FIDES_ENCLAVE_SEAL_MODEL:-}" ]; then
    sealed="${FIDES_ENCLAVE_SEALED_MODEL:?set FIDES_ENCLAVE_SEALED_MODEL with FIDES_ENCLAVE_SEAL_MODEL}"
    mkdir -p "$(dirname "$sealed")"
    set -- --model "$FIDES_ENCLAVE_SEAL_MODEL" --output "$sealed" --platform-dir "$platform"
    if [ -n "${FIDES_ENCLAVE_SEAL_CONFIG:-}" ]; then
        set -- "$@" --config "$FIDES_ENCLAVE_SEAL_CONFIG"
    fi
    if [ -n "${FIDES_ENCLAVE_SEAL_MODEL_NAME:-}" ]; then
        set -- "$@" --model-name "$FIDES_ENCLAVE_SEAL_MODEL_NAME"
    fi
    fides enclave seal "$@"
fi
echo "fides-enclave-init: platform ready in $platform" >&2
