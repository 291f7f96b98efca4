#!/usr/bin/env bash
# The forkguard demo: `bash examples/demo.sh` from the repository root (or anywhere).
#
# Needs only Python 3.9+ (Linux) and PyPI.  It
#   1. makes a venv in .venv-demo/ (kept, and reused on the next run) and
#      pip-installs this repository into it, as a user would (not editable);
#   2. starts `celery worker -P forkguard -c 2` on Celery's filesystem broker,
#      with a file:// result backend, both in a temporary folder: no server;
#   3. sends a few tasks (examples/demo_app.py) and prints where each ran and
#      how it ended;
#   4. stops the worker with TERM to its process group, checks that no
#      process of its session is left, and removes the temporary folder.
#
# Environment: PYTHON (the interpreter that makes the venv; default python3).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
VENV=$ROOT/.venv-demo
PYTHON=${PYTHON:-python3}
STOP_DEADLINE=20  # seconds a worker gets to shut down before SIGKILL

WORK=
WORKER_PID=

say() { printf '==> %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

# -- processes ----------------------------------------------------------------------

# Pids of every live process in session $1: the worker, its fork server, and
# the children (they leave the worker's process group, but not its session).
session_pids() {
    local stat_file stat rest state sid
    for stat_file in /proc/[0-9]*/stat; do
        read -r stat 2>/dev/null <"$stat_file" || continue  # gone meanwhile
        rest=${stat##*) }  # the fields after "pid (comm) "
        read -r state _ _ sid _ <<<"$rest"
        if [[ "$sid" == "$1" && "$state" != Z ]]; then
            stat_file=${stat_file#/proc/}
            echo "${stat_file%/stat}"
        fi
    done
}

running() {  # running PID: alive and not a zombie
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    [[ "${stat##*) }" != Z* ]]
}

# TERM the worker's process group; wait for the worker, then for the rest of
# its session (the fork server leaves when the worker does), with a deadline;
# SIGKILL whatever is left.  Returns non-zero unless the worker exited by
# itself with status 0 and left nothing behind.
stop_worker() {
    local deadline=$((SECONDS + STOP_DEADLINE)) forced=0 left code=0
    kill -TERM -- "-$WORKER_PID" 2>/dev/null || true
    while running "$WORKER_PID"; do
        if ((SECONDS >= deadline)); then
            echo "demo: the worker did not stop within ${STOP_DEADLINE}s; killing it" >&2
            kill -KILL -- "-$WORKER_PID" 2>/dev/null || true
            forced=1
            break
        fi
        sleep 0.1  # polling, with the deadline above
    done
    wait "$WORKER_PID" 2>/dev/null || code=$?
    if ((code != 0)); then
        echo "demo: the worker exited with status $code" >&2
        forced=1
    fi
    while left=$(session_pids "$WORKER_PID"); [[ -n "$left" ]] && ((SECONDS < deadline)); do
        sleep 0.1  # polling, with the same deadline
    done
    if [[ -n "$left" ]]; then
        echo "demo: processes left in the worker's session: $left; killing them" >&2
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
        forced=1
    fi
    WORKER_PID=
    return $forced
}

# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n "$WORKER_PID" ]]; then
        stop_worker || status=1
    fi
    # The worker's log helps with a failure, not with a Ctrl-C (status 128+N).
    if ((status != 0 && status < 128)) && [[ -n "$WORK" && -s "$WORK/worker.log" ]]; then
        echo "--- last lines of the worker's log ---" >&2
        tail -n 40 "$WORK/worker.log" >&2
    fi
    [[ -z "$WORK" ]] || rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -- the venv -----------------------------------------------------------------------

command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=/path/to/python3.9+)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); the demo needs Python 3.9 or newer"

if ! "$VENV/bin/python" -c '' 2>/dev/null; then
    say "creating $(basename "$VENV")/ with $("$PYTHON" -V 2>&1)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" \
        || die "could not create a venv (on Debian/Ubuntu: apt install python3-venv)"
fi
VPY=$VENV/bin/python

# A digest of what goes into the installed package: reinstall only when it changed.
source_digest() {
    (cd "$ROOT" && "$VPY" - <<'EOF'
import hashlib
from pathlib import Path

digest = hashlib.sha256()
for path in sorted([Path("pyproject.toml"), *Path("celery_forkguard").rglob("*.py")]):
    digest.update(str(path).encode() + b"\0" + path.read_bytes())
print(digest.hexdigest())
EOF
    )
}

STAMP=$VENV/.forkguard-demo-installed
DIGEST=$(source_digest)
# (Checked from examples/, where the source tree cannot stand in for the install.)
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$DIGEST" ]] \
    || ! (cd "$HERE" && "$VPY" -c 'import celery_forkguard') 2>/dev/null; then
    say "installing this repository into $(basename "$VENV")/ (pip install, not editable)"
    # pip always rebuilds and reinstalls a local folder, even at the same version.
    "$VPY" -m pip install --quiet --disable-pip-version-check "$ROOT"
    echo "$DIGEST" >"$STAMP"
fi

# -- the worker ----------------------------------------------------------------------

WORK=$(mktemp -d -t forkguard-demo.XXXXXX)
export FORKGUARD_DEMO_DIR=$WORK
# Run from examples/ so the installed package is used, never the source tree.
cd "$HERE"
"$VPY" -c 'import celery, celery_forkguard, sys
print("celery", celery.__version__, "| celery-forkguard", celery_forkguard.__version__,
      "| python", sys.version.split()[0])'

say "starting: celery -A demo_app worker -P forkguard -c 2  (filesystem broker in a temp dir)"
# setsid makes the worker lead its own session and process group, so one kill
# reaches it and nothing of it outlives this script.
"$VPY" -c 'import os, sys; os.setsid(); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])' \
    -m celery -A demo_app worker -P forkguard -c 2 -l info -n "forkguard-demo@%h" \
    >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!

say "sending tasks"
echo
set +e
"$VPY" demo_app.py "$WORKER_PID"
DRIVER_STATUS=$?
set -e

say "stopping the worker (TERM to its process group)"
if stop_worker; then
    echo "worker exited with status 0; no process of it is left"
else
    DRIVER_STATUS=1
fi
if ((DRIVER_STATUS == 0)); then
    say "demo OK"
else
    say "demo FAILED"
fi
exit "$DRIVER_STATUS"
