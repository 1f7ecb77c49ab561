#!/bin/bash
# The Xen lab as a CI step (.ci/run runs it after the suite only when COLO_CI_XENLAB=1; see
# docs/xen-lab.md, "The lab in CI"). It reuses the build in $XENLAB_DIR when one is there and
# never makes CI fail for a lab that cannot run here:
#   - not root, no apt-get, or the build failed (no Debian mirror)  -> "XENLAB-CI: SKIP ...", exit 0
#   - the run did not end within COLO_CI_XENLAB_BUDGET_S (default 900) -> SKIP, exit 0
#     (a loaded host, not a verdict: under load 10-24 one boot took 20-40 minutes)
#   - the lab ran and said FAIL                                       -> exit 1
#   - PASS                                                            -> exit 0
set -uo pipefail
HERE=$(dirname "$(readlink -f "$0")")
export XENLAB_DIR=${XENLAB_DIR:-/var/tmp/colo-xenlab}
BUDGET=${COLO_CI_XENLAB_BUDGET_S:-900}
skip() { echo "XENLAB-CI: SKIP $* (the suite's result stands)"; exit 0; }

[ "$(id -u)" = 0 ] || skip "not root (the lab's build needs apt-get, debootstrap, chroot)"
command -v apt-get >/dev/null || skip "no apt-get (the lab builds its images from Debian's packages)"
mkdir -p "$XENLAB_DIR"
START=$SECONDS
reused=no
[ -s "$XENLAB_DIR/xen-shadow" ] && [ -x "$XENLAB_DIR/rootfs/usr/lib/xen-4.17/bin/xl" ] && reused=yes
out="$XENLAB_DIR/ci-run.log"
# one lab at a time on a machine (the lock every lab run takes); the budget covers the wait
timeout --kill-after=30 "$BUDGET" flock "$XENLAB_DIR.lock" "$HERE/run.sh" --rounds 6 >"$out" 2>&1
rc=$?
took=$((SECONDS - START))
verdict=$(grep '^VERDICT:' "$out" | tail -n 1)
echo "XENLAB-CI: build reused=$reused, ${took}s of a ${BUDGET}s budget; log $out"
grep -E '^(BUILD|BOOT|EARLY FAULT)' "$out"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    skip "the lab did not finish within ${BUDGET}s"
fi
case "$verdict" in
    "VERDICT: PASS"*) echo "$verdict"; exit 0 ;;
    "VERDICT: FAIL build"*) skip "the lab's build failed: $(tail -n 5 "$XENLAB_DIR/build-run.log" | tr '\n' ' ')" ;;
    "") tail -n 30 "$out"; skip "the lab printed no verdict (rc=$rc)" ;;
    *) tail -n 60 "$out"; echo "$verdict"; exit 1 ;;
esac
