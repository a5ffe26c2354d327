# Shared helpers for demo.sh, loadtest.sh and bench.sh: start a process whose first log line
# says "listening on ADDR", remember its pid, and stop everything on exit.

PIDS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/flowgate.XXXXXX")

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: runs CMD with stderr to $WORK/NAME.log; sets ADDR to its listen address.
start() {
  local name=$1; shift
  "$@" 2>"$WORK/$name.log" &
  PIDS+=($!)
  local i
  for i in $(seq 1 300); do
    ADDR=$(grep -o 'listening on [^ ]*' "$WORK/$name.log" 2>/dev/null | head -1 | awk '{print $3}' || true)
    [ -n "$ADDR" ] && return 0
    if ! kill -0 "${PIDS[-1]}" 2>/dev/null; then
      echo "$name failed to start:" >&2; cat "$WORK/$name.log" >&2; exit 1
    fi
    sleep 0.1
  done
  echo "$name did not report its address" >&2; exit 1
}

build_release() {
  echo "== building (release)"
  cargo build --release --bins --quiet
  BIN=$(pwd)/target/release
}
