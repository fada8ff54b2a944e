#!/usr/bin/env bash
# The gateway in the peer kit (../shared/bench/peers): the kit's CNN served by this gateway with
# the kit's settings (one onnxruntime thread, batches of up to 32, 2 ms queue delay, pinned to
# the kit's server core), run beside the kit's own peers (plain FastAPI, LitServe, MLServer,
# PyTriton) under the kit's load as an EXTRA_TARGETS entry, then the kit's report copied to
# bench/results/peers.json (rendered by `fides bench report`).
#
# usage: PEERS_VENV=<venv prefix> scripts/peers.sh     (make the venvs first: the kit's setup.sh)
# knobs: KIT (default ../shared/bench/peers), the kit's own (PEERS, CONCS, DURATION, ...), and
#   GATEWAY_BATCH_DELAY_US (2000: the kit's MAX_DELAY_MS) for the gateway's max_queue_delay.
# The gateway is started here and stopped by its process group id on exit, also on failure.
set -euo pipefail
: "${PEERS_VENV:?set PEERS_VENV to the venv prefix given to the peer kit setup.sh}"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KIT=${KIT:-$ROOT/../shared/bench/peers}
KIT=$(cd "$KIT" && pwd)
WORK=${WORK_DIR:-$PEERS_VENV-work}
OUT=${OUT:-$WORK/out}
MAX_BATCH=${MAX_BATCH:-32}
DELAY_US=${GATEWAY_BATCH_DELAY_US:-$(( ${MAX_DELAY_MS:-2} * 1000 ))}
NAME=${MODEL_NAME:-cnn}
if [ "$(nproc)" -ge 2 ]; then SERVER_CPUS=${SERVER_CPUS-0}; else SERVER_CPUS=${SERVER_CPUS-}; fi
export SERVER_CPUS
BASE="$PEERS_VENV-base/bin/python"
PY="$ROOT/.venv/bin/python"

repo="$WORK/gateway-repo"
rm -rf "$repo" && mkdir -p "$repo/$NAME/1" "$WORK/logs"
"$BASE" "$KIT/make_model.py" "$repo/$NAME/1/model.onnx" >"$WORK/logs/gateway-model.log"
cat >"$repo/$NAME/config.yaml" <<EOF
# the peer kit's CNN, with the kit's batch limit, queue delay and threads
platform: onnx
max_batch_size: $MAX_BATCH
dynamic_batching: {max_queue_delay_microseconds: $DELAY_US}
instance_group: {count: 1, kind: cpu}
onnx: {intra_op_threads: ${THREADS:-1}}
EOF

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
key=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')
GW=""
stop_gateway() {  # TERM its process group (setsid made it the leader), then KILL
  [ -n "$GW" ] || return 0
  kill -TERM -- "-$GW" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 -- "-$GW" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$GW" 2>/dev/null || true
  GW=""
}
trap stop_gateway EXIT
trap 'stop_gateway; exit 130' INT TERM

cmd=(setsid "$PY" -m gateway.cli serve --host 127.0.0.1 --port "$port")
[ -n "$SERVER_CPUS" ] && cmd=(taskset -c "$SERVER_CPUS" "${cmd[@]}")
(cd "$ROOT" && env FIDES_MODEL_REPOSITORY="$repo" FIDES_API_KEYS="$key" FIDES_LOG_LEVEL=WARNING \
  FIDES_GRPC_PORT="$(free_port)" "${cmd[@]}") >"$WORK/logs/gateway.log" 2>&1 &
GW=$!
for _ in $(seq 600); do
  kill -0 "$GW" 2>/dev/null || { echo "gateway exited:"; tail -20 "$WORK/logs/gateway.log"; exit 1; }
  curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null && break
  sleep 0.2
done
echo "gateway (pid $GW) on 127.0.0.1:$port, pinned to CPUs '${SERVER_CPUS}'"

OUT="$OUT" WORK_DIR="$WORK" EXTRA_TARGETS="gateway=http://127.0.0.1:$port,$NAME" \
  EXTRA_HEADER="Authorization: Bearer $key" "$KIT/run_all.sh"
stop_gateway
cp "$OUT/peers.json" "$ROOT/bench/results/peers.json"
echo "wrote bench/results/peers.json (the kit's peers.md: $OUT/peers.md); run fides bench report"
