#!/bin/bash
# The Xen lab as CI's last step (.ci/run runs it after the suite; docs/xen-lab.md, "The lab in
# CI"): `lab.py --ci`, a full lab run with 3 checkpoints after the first and the same checks
# (every checkpoint proven memory-equal, failover, the C baseline; the pause ratio reported, not
# gated: 3 samples), reusing the build in $XENLAB_DIR. It runs only where it can and says why not otherwise; a machine without
# the facility never fails CI for lacking it:
#   - COLO_CI_XENLAB=0, not root, no build in $XENLAB_DIR (see below), no QEMU    -> SKIP, exit 0
#   - less than COLO_CI_XENLAB_MIN_S (default 300) left of CI's budget            -> SKIP, exit 0
#   - another lab run holds the lab's lock ($XENLAB_DIR.lock)                      -> SKIP, exit 0
#   - the run did not end within what is left of the budget                       -> SKIP, exit 0
#     (a loaded host, not a verdict: under load 10-24 one boot took 20-40 minutes)
#   - a fresh build failed (COLO_CI_XENLAB_BUILD=1: no Debian mirror)              -> SKIP, exit 0
#   - the lab said FAIL, printed no verdict, or a reused build failed to pack      -> exit 1
#   - PASS                                                                        -> exit 0
# The budget: COLO_CI_BUDGET_S (default 1200: CI's ~20 minutes) from COLO_CI_START_S (set by
# .ci/run when it starts; else now), or COLO_CI_XENLAB_BUDGET_S for the lab alone.
# No build here: the first build (apt packages, Xen from source, debootstrap, wheels) took 2-5.5
# minutes on a 2-core machine, which the suite (~10-11 min) and the lab (~6-8 min) leave no room
# for; build once with `sudo scripts/xen-lab/build.sh`, or let CI build with COLO_CI_XENLAB_BUILD=1.
# COLO_CI_XENLAB_RUN replaces the lab's command (tests/test_xen_lab_ci.py: a stand-in for the lab).
set -uo pipefail
HERE=$(dirname "$(readlink -f "$0")")
export XENLAB_DIR=${XENLAB_DIR:-/var/tmp/colo-xenlab}
now=$(date +%s)
START=${COLO_CI_START_S:-$now}
BUDGET=${COLO_CI_XENLAB_BUDGET_S:-$(( START + ${COLO_CI_BUDGET_S:-1200} - now ))}
MIN=${COLO_CI_XENLAB_MIN_S:-300}
RUN=${COLO_CI_XENLAB_RUN:-$HERE/run.sh}
skip() { echo "XENLAB-CI: SKIP $* (the suite's result stands)"; exit 0; }

[ "${COLO_CI_XENLAB:-1}" != 0 ] || skip "turned off (COLO_CI_XENLAB=0)"
[ "$(id -u)" = 0 ] || skip "not root (the lab needs root: xl in a booted dom0 image, apt for its build)"
missing=""
for f in xen-shadow vmlinuz rootfs/usr/lib/xen-4.17/bin/xl rootfs/usr/local/lib/python3.11/dist-packages/numpy; do
    [ -e "$XENLAB_DIR/$f" ] || missing="$missing $f"
done
for c in qemu-system-x86_64 gcc cpio; do
    command -v "$c" >/dev/null || missing="$missing $c"
done
reused=yes
if [ -n "$missing" ]; then
    [ "${COLO_CI_XENLAB_BUILD:-0}" = 1 ] \
        || skip "no Xen lab build in $XENLAB_DIR (missing:$missing); a first build takes 2-5.5 min on 2 cores," \
                "more than CI's budget leaves after the suite: run 'sudo scripts/xen-lab/build.sh' once" \
                "(or COLO_CI_XENLAB_BUILD=1 to build here)"
    command -v apt-get >/dev/null || skip "no apt-get to build the lab (it builds from Debian's packages)"
    reused=no
fi
[ "$BUDGET" -ge "$MIN" ] || skip "${BUDGET}s left of CI's budget, less than the lab's ${MIN}s (COLO_CI_XENLAB_MIN_S)"

mkdir -p "$XENLAB_DIR"
out="$XENLAB_DIR/ci-run.log"
t0=$SECONDS
# one lab at a time on a machine; a run already going is not waited for (it may be a long one)
XENLAB_LOCK_HELD=1 timeout --kill-after=30 "$BUDGET" flock -n -E 75 "$XENLAB_DIR.lock" "$RUN" --ci >"$out" 2>&1
rc=$?
took=$((SECONDS - t0))
[ "$rc" != 75 ] || skip "another Xen lab run holds $XENLAB_DIR.lock"
verdict=$(grep '^VERDICT:' "$out" | tail -n 1)
echo "XENLAB-CI: build reused=$reused, ${took}s of a ${BUDGET}s budget; log $out"
grep -E '^(BUILD|TREE|BOOT|EARLY FAULT|PLATFORM FAULT|FAULT AFTER|PIPELINE|FAILOVER|SURVIVOR:)' "$out"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    skip "the lab did not finish within the ${BUDGET}s left of CI's budget"
fi
case "$verdict" in
    "VERDICT: PASS"*) echo "$verdict"; exit 0 ;;
    "VERDICT: FAIL build"*)
        [ "$reused" = yes ] || skip "the lab's build failed: $(tail -n 5 "$XENLAB_DIR/build-run.log" | tr '\n' ' ')"
        tail -n 30 "$XENLAB_DIR/build-run.log"; echo "$verdict (packing this tree into the existing build)"; exit 1 ;;
    "") tail -n 40 "$out"; echo "XENLAB-CI: FAIL the lab printed no verdict (rc=$rc)"; exit 1 ;;
    *) tail -n 60 "$out"; echo "$verdict"; exit 1 ;;
esac
