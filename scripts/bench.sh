#!/usr/bin/env bash
# Benchmark: builds in release, then benches/e2e.rs starts remote-proxy and local-proxy on
# 127.0.0.1 with an in-process origin and prints throughput, accuracy, fairness, setup rate,
# scale and CPU beside direct figures. Output: bench-out/results.{md,json}, accuracy.svg.
#   scripts/bench.sh            full run (about 6 minutes)
#   scripts/bench.sh --quick    short smoke run
#   scripts/bench.sh --only throughput,setup
#   scripts/bench.sh --no-reference   skip the HAProxy reference rows
set -euo pipefail
cd "$(dirname "$0")/.."
# HAProxy (as a two-hop TCP relay) is measured beside flowgate on the same client and origin,
# so the peer comparison holds on this machine. Installed here if missing and possible.
if [[ " $* " != *" --no-reference "* ]] && ! command -v haproxy >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing haproxy for the reference rows"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy) \
      >/dev/null 2>&1 || echo "(could not install haproxy; reference rows skipped)"
  fi
fi
# The scale phase holds 5,000 tunnels, each after one request and response: 10,000 sockets
# in each proxy, and it must fit the 20,000 open-file limit common on servers (an idle tunnel
# holds no pipe). FLOWGATE_BENCH_NOFILE changes the limit the run uses.
ulimit -n "${FLOWGATE_BENCH_NOFILE:-20000}" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --bins --quiet
# Every process the run starts is its child and is killed on exit or Ctrl-C.
exec cargo bench --quiet --bench e2e -- --bin target/release "$@"
