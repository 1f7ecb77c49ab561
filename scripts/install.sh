#!/usr/bin/env bash
# Install colo-pipeline into ./.venv (Debian 12 / Python 3.11). With --test, also the test
# tools and the system packages the tests drive for real (QEMU, NBD clients, iproute2,
# Xen headers); that part needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
with_test=0
[ "${1:-}" = "--test" ] && with_test=1

apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "install.sh: need root to apt-get install $*" >&2
        return 1
    fi
    missing=$(for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
    [ -z "$missing" ] && return 0
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# Debian's python3 needs python3-venv for `python3 -m venv`
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv python3-pip
[ -x .venv/bin/python ] || python3 -m venv .venv
# pip compiles pipeline._pagehash (setup.py: csrc/, blake3 of many pages in one call): a C
# compiler and Python's headers
command -v cc >/dev/null || apt_install gcc libc6-dev
.venv/bin/python -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || apt_install python3-dev
if [ "$with_test" = 1 ]; then
    # QEMU (colo-compare and migration peers), NBD clients (disk tests), iproute2 /
    # ethtool / procps / iptables / nftables (network namespaces, offloads, partitions), the
    # Xen headers (ctypes layout checks), etcd (the failover witness)
    apt_install qemu-system-x86 qemu-utils libnbd-bin python3-libnbd nbdkit \
        nbdkit-plugin-python iproute2 ethtool procps iptables nftables libxen-dev gcc \
        libc6-dev etcd-server
    .venv/bin/pip install -q -e '.[test,fuzz]'
else
    .venv/bin/pip install -q .
fi
