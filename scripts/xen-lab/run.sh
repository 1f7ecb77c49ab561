#!/bin/bash
# The Xen lab, one command: build what is missing (reused when already built), pack the current
# working tree into dom0, boot Xen under QEMU TCG and replicate a PVH guest. Last line: the verdict.
#   scripts/xen-lab/run.sh [lab.py options: --rounds N --interval-ms MS --keep]
# Outputs live in $XENLAB_DIR (default /var/tmp/colo-xenlab), never in git. Needs root (apt, debootstrap).
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
export XENLAB_DIR=${XENLAB_DIR:-/var/tmp/colo-xenlab}
START=$SECONDS
mkdir -p "$XENLAB_DIR"
# One lab run at a time on a machine: a second one unlinks and recreates serial.log, serial.sock
# and mon.sock under the first, whose lab.py then reads the other boot's console (issue 17,
# session 19: the fast subset's `-m` replaced pytest's `-m 'not xenlab'` and a developer's
# tests booted the lab beside the lab's own 2-vCPU run; its QEMU wrote on into a deleted file).
# The lock is held by this shell's fd 9, which lab.py inherits and gives each QEMU it boots (a
# QEMU left running by --keep holds it on). ci.sh takes the same lock itself and says so
# (XENLAB_LOCK_HELD=1).
if [ -z "${XENLAB_LOCK_HELD:-}" ]; then
    exec 9>"$XENLAB_DIR.lock"
    if ! flock -n 9; then
        echo "VERDICT: FAIL not run: another Xen lab run holds $XENLAB_DIR.lock ($(fuser "$XENLAB_DIR.lock" 2>/dev/null | xargs -r ps -o pid=,args= -p | cut -c1-120 | tr '\n' ';'))"
        exit 75
    fi
fi
"$HERE/build.sh" > "$XENLAB_DIR/build-run.log" 2>&1 || { tail -n 30 "$XENLAB_DIR/build-run.log"; echo "VERDICT: FAIL build (see $XENLAB_DIR/build-run.log)"; exit 1; }
echo "BUILD: ready in $((SECONDS - START))s (log $XENLAB_DIR/build-run.log)"
exec python3 "$HERE/lab.py" "$@"
