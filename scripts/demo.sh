#!/usr/bin/env bash
# One-command demo: build, make a demo user in a throwaway database, start remote-proxy,
# local-proxy (pinning remote-proxy's TLS identity) and a local origin on loopback ports, and show curl downloads held to the
# user's rate: one connection, then three in parallel sharing the same budget.
#   RATE=500K SIZE=2000000 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
RATE=${RATE:-500K}
SIZE=${SIZE:-2000000}
command -v curl >/dev/null || { echo "demo needs curl (apt-get install curl)"; exit 1; }

build_release
DB="$WORK/demo.db"
"$BIN/remote-proxy" --db "$DB" user add demo --bandwidth "$RATE" --password demo-password
# The TLS identity users pin (made beside the database on first use, owner-only files).
PIN=$("$BIN/remote-proxy" --db "$DB" identity 2>/dev/null)
# The demo origin is on loopback, which remote-proxy refuses by default: open just it.
start remote "$BIN/remote-proxy" --db "$DB" serve --listen 127.0.0.1:0 --allow-dest 127.0.0.1/32; REMOTE=$ADDR
FLOWGATE_PASSWORD=demo-password start local "$BIN/local-proxy" --listen 127.0.0.1:0 --remote "$REMOTE" --pin "$PIN" --user demo; LOCAL=$ADDR
start origin "$BIN/flowgate-origin" --listen 127.0.0.1:0; ORIGIN=$ADDR
echo "== remote-proxy $REMOTE, local-proxy $LOCAL (SOCKS5 + HTTP), origin $ORIGIN"
echo "== the hop between them is TLS 1.3; local-proxy pins remote-proxy's identity $PIN"
echo "== user 'demo' may use $RATE per second in total"

URL="http://localhost:${ORIGIN##*:}/bytes/$SIZE"
echo
echo "== one download of $SIZE bytes: curl --socks5-hostname $LOCAL $URL"
curl -sS --socks5-hostname "$LOCAL" "$URL" -o /dev/null \
  -w '   got %{size_download} bytes in %{time_total}s = %{speed_download} bytes/s\n'

echo
HALF="http://localhost:${ORIGIN##*:}/bytes/$((SIZE / 2))"
echo "== three parallel downloads of $((SIZE / 2)) bytes through the HTTP proxy share the same budget:"
CURLS=()
for i in 1 2 3; do
  curl -sS -x "http://$LOCAL" "$HALF" -o /dev/null \
    -w "   download $i: %{size_download} bytes in %{time_total}s = %{speed_download} bytes/s\n" &
  CURLS+=($!)
done
wait "${CURLS[@]}"
echo
echo "== tunnel log lines from remote-proxy:"
grep -E 'open|close' "$WORK/remote.log" | sed 's/^/   /'
