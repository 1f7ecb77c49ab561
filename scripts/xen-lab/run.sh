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
"$HERE/build.sh" > "$XENLAB_DIR/build-run.log" 2>&1 || { tail -n 30 "$XENLAB_DIR/build-run.log"; echo "VERDICT: FAIL build (see $XENLAB_DIR/build-run.log)"; exit 1; }
echo "BUILD: ready in $((SECONDS - START))s (log $XENLAB_DIR/build-run.log)"
exec python3 "$HERE/lab.py" "$@"
