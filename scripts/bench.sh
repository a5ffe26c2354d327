#!/usr/bin/env bash
# Benchmark: builds in release, then benches/e2e.rs starts remote-proxy and local-proxy on
# 127.0.0.1 (one pair with TLS between the hops, one with --plaintext) with an in-process
# origin, and prints throughput, accuracy, fairness, setup rate, scale and CPU beside direct
# figures, plus one-stream downloads from nginx with curl (beside shadowsocks-libev), and
# time to first byte over a slow link between the hops (FLOWGATE_BENCH_DELAY_MS each way,
# default 20: a forwarder of the benchmark's own, as the machine has no netem), warm
# connections on and off, against the client going straight to the origin over that link.
# Output: bench-out/results.{md,json}, accuracy.svg.
#   scripts/bench.sh            full run (about 12 minutes)
#   scripts/bench.sh --quick    short smoke run
#   scripts/bench.sh --only throughput,setup
#   scripts/bench.sh --no-reference   skip the HAProxy reference rows
set -euo pipefail
cd "$(dirname "$0")/.."
# HAProxy (as a two-hop TCP relay) is measured beside flowgate on the same client and origin,
# so the peer comparison holds on this machine. Installed here if missing and possible.
# nginx and curl are the like-with-like origin and client; shadowsocks-libev is the
# encrypted two-hop reference beside flowgate's TLS.
missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v curl >/dev/null || missing+=(curl)
if [[ " $* " != *" --no-reference "* ]]; then
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v ss-server >/dev/null || missing+=(shadowsocks-libev)
fi
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing ${missing[*]} for the reference rows"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") \
    >/dev/null 2>&1 || echo "(could not install ${missing[*]}; those rows are skipped)"
fi
# The scale phase holds 5,000 tunnels, each after one request and response: 10,000 sockets
# in each proxy, and it must fit the 20,000 open-file limit common on servers (an idle tunnel
# holds no pipe). FLOWGATE_BENCH_NOFILE changes the limit the run uses.
ulimit -n "${FLOWGATE_BENCH_NOFILE:-20000}" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --bins --quiet
# Every process the run starts is its child and is killed on exit or Ctrl-C.
exec cargo bench --quiet --bench e2e -- --bin target/release "$@"
