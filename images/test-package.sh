#!/usr/bin/env bash
# Tests the appliance's Debian package end to end on this machine (scripts/test.sh runs it; root
# needed for dpkg). Builds it with images/build-deb.sh, then:
#   1. lintian reports no errors (overrides only with a reason, in the package);
#   2. dpkg -i installs it; `systemd-analyze verify` accepts both installed units;
#   3. as the service user (setpriv), with the installed configuration: first-start keys are made
#      0600 and kept on a second start; the bridge starts, tells a notification socket READY=1 and
#      WATCHDOG=1, answers C-ECHO (echoscu), and on SIGTERM says STOPPING=1 and exits 0; the daemon
#      without a roster exits with an error naming it;
#   4. dpkg --purge removes everything the package installed and keeps the state in /var/lib/cosilo.
# It refuses to touch a cosilo package it did not install (a real appliance's state is not a test's).
set -euo pipefail
source "$(dirname "$0")/../scripts/lib.sh"
cd "$ROOT"

MARK=/var/lib/cosilo/.installed-by-test-package
fail() { echo "test-package: FAIL: $*" >&2; exit 1; }
ok() { echo "test-package: ok: $*" >&2; }
[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i)"
if dpkg -s cosilo >/dev/null 2>&1 && [ ! -e "$MARK" ]; then
    fail "a cosilo package is installed that this test did not install; not touching it"
fi

WORK="$(mktemp -d)"
BRIDGE_PID=""; LISTENER_PID=""
cleanup() {
    [ -n "$BRIDGE_PID" ] && kill -KILL "$BRIDGE_PID" 2>/dev/null || true
    [ -n "$LISTENER_PID" ] && kill "$LISTENER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

say "build the package"
DEB="$(images/build-deb.sh | tail -n 1)"
[ -f "$DEB" ] || fail "build-deb.sh did not produce a package"
ok "built $DEB ($(du -h "$DEB" | cut -f1))"

say "lintian"
lintian --fail-on error --no-tag-display-limit "$DEB" | tee "$WORK/lintian.txt" >&2 || fail "lintian reports errors"
ok "lintian: no errors ($(grep -c '^W:' "$WORK/lintian.txt" || true) warnings)"

say "dpkg -i"
if dpkg -s cosilo >/dev/null 2>&1; then dpkg --purge cosilo >/dev/null; rm -rf /var/lib/cosilo; fi
dpkg -i "$DEB" >&2
touch "$MARK"
for f in /usr/bin/cosilo /usr/lib/cosilo/libonnxruntime.so.1.31.1 /etc/cosilo/site.toml \
         /etc/cosilo/bridge.toml /lib/systemd/system/cosilo.service \
         /lib/systemd/system/cosilo-bridge.service /usr/lib/sysusers.d/cosilo.conf; do
    [ -e "$f" ] || fail "$f not installed"
done
getent passwd cosilo >/dev/null || fail "no system user cosilo"
[ "$(stat -c %U /var/lib/cosilo)" = cosilo ] || fail "/var/lib/cosilo is not the service user's"
ok "installed: binary, library, configuration, units, user, state directory"

say "systemd-analyze verify"
systemd-analyze verify /lib/systemd/system/cosilo.service /lib/systemd/system/cosilo-bridge.service 2>&1 | tee "$WORK/verify.txt" >&2
[ ! -s "$WORK/verify.txt" ] || fail "systemd-analyze verify complained"
ok "systemd-analyze verify accepts both units"

# The units' environment, as the service user (no capabilities, no new privileges).
ENVIRONMENT=(ORT_DYLIB_PATH=/usr/lib/cosilo/libonnxruntime.so.1.31.1 CANDLE_BARRIER_POOL_SPIN_LIMIT=200 NO_COLOR=1 PATH=/usr/bin:/bin)
# setpriv and env exec: the service's process has the PID a background `as_service ... &` gives.
as_service() { setpriv --reuid=cosilo --regid=cosilo --init-groups --no-new-privs --inh-caps=-all --bounding-set=-all env -i "${ENVIRONMENT[@]}" "$@"; }
cd /var/lib/cosilo # the units' WorkingDirectory

say "first-start keys"
as_service /usr/bin/cosilo ensure-keys --site-config /etc/cosilo/site.toml --bridge-config /etc/cosilo/bridge.toml >"$WORK/roster-entry.txt"
grep -q '^public_key = "' "$WORK/roster-entry.txt" || fail "ensure-keys printed no roster entry"
for k in /var/lib/cosilo/keys/h1.key /var/lib/cosilo/deid.key; do
    [ "$(stat -c '%a %U' "$k")" = "600 cosilo" ] || fail "$k is $(stat -c '%a %U' "$k"), not 600 cosilo"
done
SUM="$(cat /var/lib/cosilo/keys/h1.key /var/lib/cosilo/deid.key | sha256sum)"
as_service /usr/bin/cosilo ensure-keys --site-config /etc/cosilo/site.toml --bridge-config /etc/cosilo/bridge.toml >/dev/null
[ "$SUM" = "$(cat /var/lib/cosilo/keys/h1.key /var/lib/cosilo/deid.key | sha256sum)" ] || fail "a second start changed a key"
ok "keys made 0600 by the service user, kept on a second start"

say "the daemon without a roster"
if as_service /usr/bin/cosilo run --config /etc/cosilo/site.toml >"$WORK/run.log" 2>&1; then
    fail "cosilo run started without a roster"
fi
grep -q "/etc/cosilo/roster.toml" "$WORK/run.log" || fail "the daemon's error does not name the roster: $(cat "$WORK/run.log")"
ok "the daemon refuses to start without a roster: $(grep -m1 error "$WORK/run.log")"

say "the bridge as a service"
# The installed configuration binds 0.0.0.0:11112. When another process holds that port on this
# shared machine, a copy differing only in `bind` (a free loopback port) is used instead.
CONFIG=/etc/cosilo/bridge.toml
PORT=11112
if ! python3 -c 'import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 11112))' 2>/dev/null; then
    PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    CONFIG="$WORK/bridge.toml"
    sed "s/^bind = \"0.0.0.0:11112\"/bind = \"127.0.0.1:$PORT\"/" /etc/cosilo/bridge.toml >"$CONFIG"
    chmod 0644 "$CONFIG"; chmod 0755 "$WORK"
    grep -q "127.0.0.1:$PORT" "$CONFIG" || fail "could not move the bridge to a free port"
    echo "port 11112 is taken here: the bridge listens on 127.0.0.1:$PORT (only bind changed)" >&2
fi
# A notification socket as systemd would give it (abstract, "@..."), recording what arrives.
NOTIFY="cosilo-test-package-$$"
python3 - "$NOTIFY" "$WORK/notify.txt" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0" + sys.argv[1])
with open(sys.argv[2], "a", buffering=1) as out:
    while True:
        out.write(s.recv(4096).decode().replace("\n", " ") + "\n")
PY
LISTENER_PID=$!
wait_for() { # what seconds command...
    local what="$1" secs="$2"; shift 2
    local deadline=$((SECONDS + secs))
    until "$@"; do
        [ $SECONDS -lt $deadline ] || fail "timed out after ${secs}s waiting for $what"
        sleep 0.2
    done
}
wait_for "the notification listener" 10 python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect('\0$NOTIFY')"
ENVIRONMENT+=(NOTIFY_SOCKET="@$NOTIFY" WATCHDOG_USEC=2000000)
# Not through the function: a backgrounded function is a subshell, and $! would be its PID.
setpriv --reuid=cosilo --regid=cosilo --init-groups --no-new-privs --inh-caps=-all --bounding-set=-all \
    env -i "${ENVIRONMENT[@]}" /usr/bin/cosilo bridge --config "$CONFIG" --store /var/lib/cosilo/store >"$WORK/bridge.log" 2>&1 &
BRIDGE_PID=$!
wait_for "READY=1 from the bridge" 60 grep -q "READY=1" "$WORK/notify.txt"
ok "the bridge notified: $(grep -m1 READY=1 "$WORK/notify.txt")"
echoscu -aet TEST -aec COSILO 127.0.0.1 "$PORT" >&2 || fail "no C-ECHO answer: $(cat "$WORK/bridge.log")"
ok "C-ECHO answered on port $PORT"
wait_for "WATCHDOG=1 from the bridge" 10 grep -q "WATCHDOG=1" "$WORK/notify.txt"
ok "watchdog notifications arrive"
kill -TERM "$BRIDGE_PID"
STATUS=0; wait "$BRIDGE_PID" || STATUS=$?
BRIDGE_PID=""
[ "$STATUS" = 0 ] || fail "the bridge exited $STATUS on SIGTERM: $(cat "$WORK/bridge.log")"
grep -q "STOPPING=1" "$WORK/notify.txt" || fail "no STOPPING=1 on SIGTERM"
[ "$(stat -c %U /var/lib/cosilo/store)" = cosilo ] || fail "the store is not the service user's"
ok "SIGTERM: STOPPING=1 and exit 0"

say "dpkg --purge"
cd "$ROOT"
dpkg --purge cosilo >&2
for f in /usr/bin/cosilo /usr/lib/cosilo /etc/cosilo /lib/systemd/system/cosilo.service \
         /lib/systemd/system/cosilo-bridge.service /usr/lib/sysusers.d/cosilo.conf \
         /usr/lib/tmpfiles.d/cosilo.conf /usr/share/doc/cosilo; do
    [ ! -e "$f" ] || fail "$f is still there after purge"
done
for f in /var/lib/cosilo/deid.key /var/lib/cosilo/keys/h1.key /var/lib/cosilo/store; do
    [ -e "$f" ] || fail "purge removed the state $f"
done
ok "purge removed what the package installed and kept the state (keys, store)"
# This test's own state goes; the system user stays (Debian practice).
rm -rf /var/lib/cosilo
echo "test-package: all checks passed" >&2
