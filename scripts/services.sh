#!/usr/bin/env bash
# Starts and stops the local services on 127.0.0.1: the BigQuery emulator and the Lever simulator.
#   scripts/services.sh start-bq        -> prints BIGQUERY_EMULATOR_URL=...
#   scripts/services.sh start-sim ARGS  -> prints LEVER_API_URL=...
#   scripts/services.sh start-moto      -> prints MOTO_URL=... (Secrets Manager and friends)
#   scripts/services.sh stop
# State lives in .run/ (pids, logs, ports).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=.run
mkdir -p "$RUN"

free_port() {
  .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_http() { # url, name, log
  for _ in $(seq 1 150); do
    if curl -s -o /dev/null "$1"; then return 0; fi
    sleep 0.2
  done
  echo "$2 did not start; its log:" >&2
  tail -n 40 "$3" >&2
  return 1
}

case "${1:-}" in
  start-bq)
    port=${BQ_PORT:-$(free_port)}
    .venv/bin/bqemulator start --rest-host 127.0.0.1 --rest-port "$port" --grpc-port 0 \
      --project "${BQ_PROJECT:-lever-demo}" --log-level warning >"$RUN/bqemulator.log" 2>&1 &
    echo $! >"$RUN/bqemulator.pid"
    wait_http "http://127.0.0.1:$port/" "the BigQuery emulator" "$RUN/bqemulator.log"
    echo "http://127.0.0.1:$port" >"$RUN/bq.url"
    echo "BIGQUERY_EMULATOR_URL=http://127.0.0.1:$port"
    ;;
  start-moto)
    port=${MOTO_PORT:-$(free_port)}
    .venv/bin/moto_server -H 127.0.0.1 -p "$port" >"$RUN/moto.log" 2>&1 &
    echo $! >"$RUN/moto.pid"
    wait_http "http://127.0.0.1:$port/moto-api/" "the moto server" "$RUN/moto.log"
    echo "MOTO_URL=http://127.0.0.1:$port"
    ;;
  start-sim)
    shift
    port=${SIM_PORT:-$(free_port)}
    target/release/lever-sim --port "$port" "$@" >"$RUN/lever-sim.log" 2>&1 &
    echo $! >"$RUN/lever-sim.pid"
    wait_http "http://127.0.0.1:$port/_sim/stats" "the Lever simulator" "$RUN/lever-sim.log"
    echo "http://127.0.0.1:$port/v1" >"$RUN/sim.url"
    echo "LEVER_API_URL=http://127.0.0.1:$port/v1"
    ;;
  stop)
    for name in lever-sim moto bqemulator; do
      if [ -f "$RUN/$name.pid" ]; then
        kill "$(cat "$RUN/$name.pid")" 2>/dev/null || true
        rm -f "$RUN/$name.pid"
      fi
    done
    ;;
  *)
    echo "usage: $0 start-bq | start-moto | start-sim [ARGS] | stop" >&2
    exit 2
    ;;
esac
