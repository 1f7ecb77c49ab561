#!/bin/bash
# Build everything the Xen lab boots, into $XENLAB_DIR (default /var/tmp/colo-xenlab, outside git).
# Heavy steps are skipped when their output already exists; the last step (pack) always runs so
# the dom0 image carries the current working tree of this project.
#   1. host packages            2. Xen 4.17 hypervisor from Debian's source + CONFIG_SHADOW_PAGING=y
#   3. dom0 kernel (from the .deb)  4. debootstrap dom0 root fs + Python deps as wheels (offline in dom0)
#   5. pack: project copy, guest workload (memwork.c), C baseline (crep.c), configs, initramfs
# Why shadow paging: Debian's binary lacks it, and log-dirty then fails with EOPNOTSUPP under TCG
# (no HAP dirty logging without it on this nested setup; see /work/shared/xenlab/README.md).
set -euo pipefail
LAB=${XENLAB_DIR:-/var/tmp/colo-xenlab}
HERE=$(dirname "$(readlink -f "$0")")
PROJECT=$(readlink -f "$HERE/../..")
mkdir -p "$LAB"; cd "$LAB"
export DEBIAN_FRONTEND=noninteractive
ts() { echo "== $(date +%T) [${SECONDS}s] $*"; }

ts "host packages"
need=""
for p in qemu-system-x86 busybox-static debootstrap flex bison gcc make libc6-dev libxen-dev \
         dpkg-dev xz-utils cpio python3-pip; do
    dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
done
[ -z "$need" ] || apt-get install -y --no-install-recommends $need >/dev/null

ts "kernel (extracted from the .deb; used by dom0 and by the PVH guest)"
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
KV=${KPKG#linux-image-}
if [ ! -s vmlinuz ] || [ ! -d "kpkg/root/lib/modules/$KV" ]; then
    rm -rf kpkg; mkdir -p kpkg
    (cd kpkg && apt-get download "$KPKG" >/dev/null && dpkg-deb -x linux-image-*.deb root)
    cp "kpkg/root/boot/vmlinuz-$KV" vmlinuz
fi

ts "Xen hypervisor with shadow paging"
if [ ! -s xen-shadow ]; then
    cat > /etc/apt/sources.list.d/colo-xenlab-src.sources <<'EOS'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
    apt-get update -o Dir::Etc::sourcelist=/etc/apt/sources.list.d/colo-xenlab-src.sources \
        -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0 >/dev/null
    mkdir -p src
    (cd src
     [ -d xen-src ] || { apt-get source --download-only xen >/dev/null 2>&1
                         dpkg-source -x --no-check xen_*.dsc xen-src >/dev/null; }
     cp xen-src/debian/xen-kconfig xen-src/xen/.config
     echo CONFIG_SHADOW_PAGING=y >> xen-src/xen/.config
     make -C xen-src/xen olddefconfig >/dev/null
     grep -q '^CONFIG_SHADOW_PAGING=y' xen-src/xen/.config
     nice -n 10 make -C xen-src/xen -j"$(nproc)" >build.log 2>&1)
    cp src/xen-src/xen/xen xen-shadow.tmp && mv xen-shadow.tmp xen-shadow
fi

ts "debootstrap dom0 root fs"
if [ ! -x rootfs/usr/lib/xen-4.17/bin/xl ]; then
    rm -rf rootfs
    nice -n 10 debootstrap --variant=minbase \
        --include=xen-utils-4.17,python3,kmod,busybox-static,procps \
        bookworm rootfs http://deb.debian.org/debian >debootstrap.log 2>&1
    M=lib/modules/$KV
    mkdir -p rootfs/$M/kernel/drivers
    cp -a kpkg/root/$M/kernel/drivers/xen rootfs/$M/kernel/drivers/
    cp kpkg/root/$M/modules.order kpkg/root/$M/modules.builtin* rootfs/$M/
    chroot rootfs depmod "$KV"
    rm -rf rootfs/usr/share/doc rootfs/usr/share/man rootfs/usr/share/locale rootfs/var/lib/apt/lists/*
fi

ts "Python dependencies for dom0's Debian python3 (3.11) as wheels, installed into the image"
SITE=rootfs/usr/local/lib/python3.11/dist-packages
if [ ! -d "$SITE/blake3" ] || [ ! -d "$SITE/numpy" ]; then
    mkdir -p "$SITE"
    /usr/bin/python3 -m pip install --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
        --python-version 3.11 --implementation cp --target "$SITE" numpy pyzmq lz4 blake3 \
      || python3 -m pip install --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
        --python-version 3.11 --implementation cp --target "$SITE" numpy pyzmq lz4 blake3
fi

ts "pack: project tree, guest workload, C baseline, configs, initramfs"
"$HERE/pack.sh"
ts "done"
