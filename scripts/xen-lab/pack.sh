#!/bin/bash
# Put the current state of this project into the dom0 image and pack it (cheap; run on every lab run).
# Needs the heavy outputs of build.sh in $XENLAB_DIR (rootfs/, vmlinuz).
set -euo pipefail
LAB=${XENLAB_DIR:-/var/tmp/colo-xenlab}
HERE=$(dirname "$(readlink -f "$0")")
PROJECT=$(readlink -f "$HERE/../..")
cd "$LAB"
[ -x rootfs/usr/lib/xen-4.17/bin/xl ] || { echo "pack.sh: no dom0 root fs in $LAB; run build.sh first" >&2; exit 1; }

# the project (working tree, not only committed files), importable by dom0's /usr/bin/python3.
# Never the host's virtualenv or tool caches: dom0 has its own wheels, and a checkout's .venv
# (~270 MB) made the initramfs too big to unpack in dom0's memory ("Initramfs unpacking
# failed: write error", then no init).
rm -rf rootfs/opt/colo-pipeline; mkdir -p rootfs/opt/colo-pipeline
tar -C "$PROJECT" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
    --exclude=./.venv --exclude=./venv --exclude=./.hypothesis --exclude=./.ruff_cache \
    --exclude=./build --exclude=./dist -cf - . | tar -C rootfs/opt/colo-pipeline -xf -
echo /opt/colo-pipeline > rootfs/usr/local/lib/python3.11/dist-packages/colo-pipeline.pth
printf '#!/bin/sh\nexec /usr/bin/python3 -m pipeline.cli "$@"\n' > rootfs/usr/local/bin/colo-pipeline
chmod +x rootfs/usr/local/bin/colo-pipeline

# the C baseline replicator, built against the host's libxen-dev (same 4.17 ABI as dom0's libraries)
gcc -O2 -Wall -o rootfs/root/crep "$HERE/dom0/crep.c" -lxenctrl -lxenforeignmemory -lxendevicemodel

# the PVH guest: Debian's kernel + a busybox initrd whose init runs memwork
rm -rf pvh-initrd; mkdir -p pvh-initrd/{bin,proc,sys,dev,tmp}
cp /bin/busybox pvh-initrd/bin/
for a in sh mount echo sleep cat nproc seq grep dmesg head; do ln -sf busybox pvh-initrd/bin/$a; done
gcc -O2 -Wall -static -o pvh-initrd/bin/memwork "$HERE/guest/memwork.c"
gcc -O2 -Wall -static -o pvh-initrd/bin/vcpuinfo "$HERE/guest/vcpuinfo.c"
# vcpuinfo every 5 s: the guest's own word on where each vCPU's vcpu_info is registered, which
# dom0 gives each node (guest.xen_vcpu_info); a restored twin says it again within 5 s.
# memwork on every vCPU, each pinned to its own (issue 17, item 4: xl's vcpus, lab.py --vcpus)
cat > pvh-initrd/init <<'EOI'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "PVH-GUEST-UP cpus=$(nproc) $(cat /proc/cmdline)" > /dev/hvc0
# the guest's APIC mode, for dom0 (issue 17, item 1: nox2apic): the CPU flag Linux keeps (it clears
# x2apic under nox2apic) and its own APIC lines from the kernel log
echo "GUEST-APIC x2apic_flag=$(grep -c -w x2apic /proc/cpuinfo)" > /dev/hvc0
dmesg | grep -i apic | grep -v -i 'command line' | head -n 8 | while read -r l; do echo "GUEST-APIC $l"; done > /dev/hvc0
(while :; do /bin/vcpuinfo; sleep 5; done) > /dev/hvc0 2>&1 &
for cpu in $(seq 1 $(($(nproc) - 1))); do /bin/memwork "$cpu" > /dev/hvc0 2>&1 & done
exec /bin/memwork 0 > /dev/hvc0 2>&1
EOI
chmod +x pvh-initrd/init
(cd pvh-initrd && find . | cpio -o -H newc 2>/dev/null | gzip -1) > rootfs/root/pvh-initrd.gz
cp vmlinuz rootfs/root/vmlinuz
# tsc_mode native: QEMU TCG's emulated SVM reports RDTSCP as an RDTSC exit and Xen's emulated-TSC
# path then crashes the guest. fifo_events=0: 2-level event channels keep no queue state in Xen.
# xen_nopvspin (issue 17, item 4): with 2 vCPUs, both twins' kernels (Debian's 6.1) died after
# xl restore with "kernel BUG at arch/x86/xen/spinlock.c:62" in dummy_handler, the handler of the
# PV spinlock's kicker IPI, which must never be delivered: after the restore Xen showed every
# IPI port of the guest unmasked, so the first contended lock's kick ran it (prim too, which
# nothing but xl save/restore touched). Plain qspinlocks; a 1-vCPU guest never uses PV spinlocks.
for n in prim sec; do cat > rootfs/root/$n.cfg <<EOC
name = "$n"
type = "pvh"
kernel = "/root/vmlinuz"
ramdisk = "/root/pvh-initrd.gz"
extra = "console=hvc0 xen.fifo_events=0 xen_nopvspin nox2apic quiet"
memory = 128
vcpus = 1
on_crash = "preserve"
# a guest that reboots here has died (a triple fault is shut down as "reboot"): gone, not re-created
# under a new id as xl's default would (the Xen lab lost its secondary that way once)
on_reboot = "destroy"
# a guest whose vCPUs all went down (a HLT with interrupts off: an early-boot exception) is
# powered off by Xen without a line in its log; kept, dom0 sees it shut down (issue 17, session 17)
on_poweroff = "preserve"
tsc_mode = "native"
# shadow paging (issue 17, session 18): every triple fault of the lab came on HAP, which QEMU
# emulates as nested paging (QEMU 7.2: 3 in 10 boots, all 2-vCPU); none on shadow paging
hap = ${XENLAB_HAP:-0}
EOC
done

# dom0 init: Xen daemons, guest consoles logged to /var/log/xen/console/guest-<name>.log, then the
# lab driver when the kernel command line asks for it (xenlab.run=1), else an interactive shell.
cat > rootfs/init <<'EOI'
#!/bin/sh
export PATH=/usr/lib/xen-4.17/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd; do modprobe $m; done
mount -t xenfs xenfs /proc/xen
mkdir -p /run/xen /run/xenstored /run/lock /var/log/xen/console /var/lib/xen /var/lib/xenstored /var/run
/usr/lib/xen-4.17/bin/oxenstored --pid-file /run/xenstored.pid || /usr/lib/xen-4.17/bin/xenstored --pid-file /run/xenstored.pid
/usr/lib/xen-4.17/bin/xen-init-dom0
# --timestamp=guest: each guest console line starts with dom0's wall time ("[YYYY-mm-dd HH:MM:SS] "):
# the lab checks the guest's own clock (memwork's mono=) against the time that really passed
# At SCHED_RR 3 (the nodes' heartbeat's level, above their checkpoint work at FIFO 1-2): at normal
# priority it waited seconds behind a checkpoint's real-time data path (issue 17, session 19,
# boot 04: commits of 21-48 s), so a tick printed just before a PVM pause was stamped after it
# (the clock check: +4.8 s between two ticks stamped in one second), and a line left in prim's
# console ring at the checkpoint was printed again from the SVM's copy of that ring (its
# survivor's "clock went back 26.6 s": the PVM's old line). Its work is the guests' lines.
chrt -r 3 /usr/lib/xen-4.17/bin/xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console --timestamp=guest
hostname dom0
busybox ip link set lo up    # the nodes talk over 127.0.0.1 (minbase has no iproute2)
echo "XENLAB-DOM0-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
if grep -q 'xenlab.run=1' /proc/cmdline; then
    /usr/bin/python3 /opt/colo-pipeline/scripts/xen-lab/dom0/lab_dom0.py </dev/null >/dev/hvc0 2>&1
    echo "XENLAB-DOM0-EXIT rc=$?" >/dev/hvc0
fi
exec setsid sh -c 'exec /bin/bash -i </dev/hvc0 >/dev/hvc0 2>&1'
EOI
chmod +x rootfs/init

(cd rootfs && find . | cpio -o -H newc 2>/dev/null) > dom0-rootfs.cpio.tmp
mv dom0-rootfs.cpio.tmp dom0-rootfs.cpio
ls -la dom0-rootfs.cpio
