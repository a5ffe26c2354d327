#!/usr/bin/env bash
# Load test: USERS users x CONNS parallel curl --socks5-hostname downloads each, for
# DURATION seconds, from a local origin through one local-proxy/remote-proxy pair; prints each
# user's achieved rate beside its configured rate (RATE=unlimited prints the rate reached).
#   USERS=4 CONNS=4 RATE=1M DURATION=10 [PLAINTEXT=1] scripts/loadtest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
USERS=${USERS:-4}
CONNS=${CONNS:-4}
RATE=${RATE:-1M}
DURATION=${DURATION:-10}
command -v curl >/dev/null || { echo "loadtest needs curl (apt-get install curl)"; exit 1; }

build_release
DB="$WORK/load.db"
for u in $(seq 1 "$USERS"); do
  "$BIN/remote-proxy" --db "$DB" user add "user$u" --bandwidth "$RATE" --password "pw$u" >/dev/null
done
# TLS between the hops unless PLAINTEXT=1 (then both run --plaintext, loopback only).
if [ "${PLAINTEXT:-0}" = 1 ]; then
  REMOTE_HOP=(--plaintext); LOCAL_HOP=(--plaintext)
else
  REMOTE_HOP=(); LOCAL_HOP=(--pin "$("$BIN/remote-proxy" --db "$DB" identity 2>/dev/null)")
fi
start remote "$BIN/remote-proxy" --db "$DB" serve --listen 127.0.0.1:0 --allow-dest 127.0.0.1/32 "${REMOTE_HOP[@]}"; REMOTE=$ADDR
start local "$BIN/local-proxy" --listen 127.0.0.1:0 --remote "$REMOTE" "${LOCAL_HOP[@]}"; LOCAL=$ADDR
start origin "$BIN/flowgate-origin" --listen 127.0.0.1:0; ORIGIN=$ADDR
URL="http://localhost:${ORIGIN##*:}/bytes/100000000000"
CURLS=()
echo "== $USERS users x $CONNS connections, $RATE each user, ${DURATION}s"

for u in $(seq 1 "$USERS"); do
  for c in $(seq 1 "$CONNS"); do
    # --max-time ends each download after DURATION seconds (curl exit 28 is expected).
    curl -s --socks5-hostname "$LOCAL" -U "user$u:pw$u" --max-time "$DURATION" "$URL" \
      -o /dev/null -w '%{size_download} %{time_total}\n' >"$WORK/u$u.c$c" || true &
    CURLS+=($!)
  done
done
wait "${CURLS[@]}"

python3 - "$WORK" "$USERS" "$CONNS" "$RATE" <<'PY'
import sys, re, os
work, users, conns, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
m = re.fullmatch(r'(?i)\s*([\d.]+)\s*(k|m|g|kib|mib|gib|kb|mb|gb|b)?\s*(/s)?\s*', rate)
mult = {None:1,'b':1,'k':1e3,'kb':1e3,'m':1e6,'mb':1e6,'g':1e9,'gb':1e9,'kib':1024,'mib':1024**2,'gib':1024**3}
if rate.strip().lower() == 'unlimited':
    want = None
elif m:
    want = float(m.group(1)) * mult[(m.group(2) or '').lower() or None]
else:
    sys.exit(f"loadtest: cannot read RATE={rate!r} (use e.g. 500K, 2MiB, unlimited)")
print(f"{'user':<8} {'configured B/s':>15} {'achieved B/s':>14} {'error':>8}")
for u in range(1, users + 1):
    total, secs = 0, 0.0
    for c in range(1, conns + 1):
        f = os.path.join(work, f"u{u}.c{c}")
        size, t = open(f).read().split()
        total += int(float(size)); secs = max(secs, float(t))
    got = total / secs if secs else 0
    if want is None:
        print(f"user{u:<4} {'unlimited':>15} {got:>14.0f} {'-':>8}")
    else:
        print(f"user{u:<4} {want:>15.0f} {got:>14.0f} {100*(got-want)/want:>+7.1f}%")
PY
