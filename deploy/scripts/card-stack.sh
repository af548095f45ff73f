#!/usr/bin/env bash
# card-stack.sh — bring up the PC/SC stack that Kizuna's card reader uses:
# pcscd (the PC/SC daemon) with the vsmartcard vpcd driver, which exposes the
# virtual readers "Virtual PCD 00 00" (TCP 35963) and "Virtual PCD 00 01"
# (TCP 35964) that `kizuna-card-emu` connects to.
#
# Usage (as root):  card-stack.sh [start|stop|restart|status|start-no-readers]
#                   (default: start)
#
# start-no-readers runs pcscd with an empty reader configuration directory,
# so PC/SC answers "no readers available": the tests use it to check the
# reader loop's degraded mode and its recovery. A later `start` notices that
# mode and restarts pcscd with the readers.
#
# Idempotent: packages are installed only when missing, pcscd is started only
# when it is not already running. There is no systemd in our containers, so
# pcscd runs as `pcscd --foreground` detached with setsid, without
# --auto-exit, logging to $KIZUNA_PCSCD_LOG. Waits are bounded.
set -euo pipefail

LOG_FILE="${KIZUNA_PCSCD_LOG:-/var/log/kizuna-pcscd.log}"
PID_FILE="${KIZUNA_PCSCD_PID:-/run/kizuna-pcscd.pid}"
SOCKET="/run/pcscd/pcscd.comm"
WAIT_SECS="${KIZUNA_CARD_STACK_WAIT_SECS:-20}"
# vpcd listens on CHANNELID + slot; read the base from the driver config.
VPCD_CONF="/etc/reader.conf.d/vpcd"
MODE_FILE="${KIZUNA_PCSCD_MODE:-/run/kizuna-pcscd.mode}"
EMPTY_CONF_DIR="${KIZUNA_PCSCD_EMPTY_CONF:-/run/kizuna-pcscd-no-readers}"

say() { echo "card-stack: $*"; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        say "must run as root (installs packages, starts pcscd)" >&2
        exit 1
    fi
}

install_packages() {
    local missing=()
    for pkg in pcscd vsmartcard-vpcd libpcsclite-dev pkg-config; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        say "packages present: pcscd vsmartcard-vpcd libpcsclite-dev pkg-config"
        return
    fi
    say "installing missing packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" ||
        { say "apt-get update, then retry"; apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"; }
}

vpcd_base_port() {
    local hex
    hex="$(awk '/^[[:space:]]*CHANNELID/ {print $2}' "$VPCD_CONF" 2>/dev/null | head -n1)"
    if [ -z "$hex" ]; then echo 35963; else printf '%d\n' "$hex"; fi
}

# The pid of the running pcscd, or nothing. Prefers our pid file, then the
# daemon's own; checks that the pid really is a pcscd process.
pcscd_pid() {
    local pid
    for f in "$PID_FILE" /run/pcscd/pcscd.pid; do
        if [ -r "$f" ]; then
            pid="$(tr -dc '0-9' < "$f")"
            if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "pcscd" ]; then
                echo "$pid"
                return
            fi
        fi
    done
    pgrep -x pcscd | head -n1 || true
}

# True when TCP port $1 is in LISTEN state (vpcd opens it once pcscd loaded
# the driver and created the reader).
port_listening() {
    local hex
    hex="$(printf '%04X' "$1")"
    awk -v p=":$hex" '$2 ~ p"$" && $4 == "0A" {found=1} END {exit !found}' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

readers_ready() {
    local base
    base="$(vpcd_base_port)"
    [ -S "$SOCKET" ] && port_listening "$base" && port_listening "$((base + 1))"
}

launch() {
    # $1: extra pcscd arguments (the empty config dir), $2: mode name.
    say "starting pcscd --foreground (detached) $1, log $LOG_FILE"
    mkdir -p "$(dirname "$LOG_FILE")"
    # The daemon must not inherit our open descriptors: a caller running
    # under `flock LOCKFILE …` would hand its lock to pcscd, which would
    # then hold it for as long as it lives. The subshell closes them and
    # becomes pcscd (setsid does not fork here: no job control).
    # shellcheck disable=SC2086
    (
        for fd in /proc/"$BASHPID"/fd/*; do
            fd=${fd##*/}
            if [ "$fd" -gt 2 ] 2>/dev/null; then
                eval "exec $fd>&-" 2>/dev/null || true
            fi
        done
        exec setsid pcscd --foreground --info $1
    ) </dev/null >>"$LOG_FILE" 2>&1 &
    echo $! > "$PID_FILE"
    echo "$2" > "$MODE_FILE"
    say "pcscd pid $(cat "$PID_FILE")"
}

start_no_readers() {
    need_root
    install_packages
    if [ -n "$(pcscd_pid)" ]; then stop; fi
    mkdir -p "$EMPTY_CONF_DIR"
    launch "--config $EMPTY_CONF_DIR" no-readers
    local deadline=$((SECONDS + WAIT_SECS))
    until [ -S "$SOCKET" ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "pcscd socket $SOCKET missing after ${WAIT_SECS}s; see $LOG_FILE" >&2
            exit 1
        fi
        sleep 0.1
    done
    say "ready without readers (degraded-mode test)"
}

start() {
    need_root
    install_packages
    local pid
    pid="$(pcscd_pid)"
    if [ -n "$pid" ] && [ "$(cat "$MODE_FILE" 2>/dev/null)" = "no-readers" ]; then
        say "pcscd (pid $pid) runs without readers; restarting it with readers"
        stop
        pid=""
    fi
    if [ -n "$pid" ]; then
        say "pcscd already running (pid $pid)"
    else
        launch "" readers
    fi
    local base deadline
    base="$(vpcd_base_port)"
    deadline=$((SECONDS + WAIT_SECS))
    until readers_ready; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "vpcd readers not ready after ${WAIT_SECS}s (socket $SOCKET, ports $base/$((base + 1))); see $LOG_FILE" >&2
            exit 1
        fi
        if [ -z "$(pcscd_pid)" ]; then
            say "pcscd exited during start-up; see $LOG_FILE" >&2
            tail -n 20 "$LOG_FILE" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
    say "ready: readers 'Virtual PCD 00 00' (port $base) and 'Virtual PCD 00 01' (port $((base + 1)))"
}

stop() {
    need_root
    local pid deadline
    pid="$(pcscd_pid)"
    if [ -z "$pid" ]; then
        say "pcscd not running"
    else
        say "stopping pcscd (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + WAIT_SECS))
        while [ -d "/proc/$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "pcscd" ]; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                say "pcscd did not stop in ${WAIT_SECS}s; sending KILL"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    fi
    rm -f "$PID_FILE" "$MODE_FILE"
    say "stopped"
}

status() {
    local pid
    pid="$(pcscd_pid)"
    if [ -n "$pid" ] && readers_ready; then
        say "running (pid $pid), vpcd readers ready"
    elif [ -n "$pid" ]; then
        say "running (pid $pid), vpcd readers NOT ready"
        exit 3
    else
        say "not running"
        exit 3
    fi
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    status) status ;;
    start-no-readers) start_no_readers ;;
    *) echo "usage: $0 [start|stop|restart|status|start-no-readers]" >&2; exit 2 ;;
esac
