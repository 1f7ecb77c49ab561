"""Failover, re-protection and failback of a guest with a replicated disk: two hosts with
``node.role = "auto"`` (HostPair, real processes, CURVE), each with its own disk image
exported over NBD to its guest, written by a stand-in for the guest's disk driver.

1. Host a runs the guest (its image has data), b joins as the secondary: a full disk
   sync fills b's empty image; at a checkpoint both images are equal.
2. Host a is lost at a named point: right after a guest write went into a's image, before
   its forward was sent (``disk.primary.applied``, ``killgroup``: the whole node dies, as
   with its host). So a's image holds a block b never saw, besides the torn epoch's.
3. b takes over; its disk stage becomes the primary's in place; its guest writes on.
   a comes back with its unchanged config and its old image: same generation, so the sync
   compares every MiB and sends exactly the MiBs where the two images differ (counted at
   the disk stage; the test computes that set from the two image files). At a checkpoint
   after re-protection both images are equal.
4. Failback: b is lost the same way while its guest writes; a's guest (its disk driver
   connected to a's export since a joined as the secondary) writes on through the
   takeover and a's change of role without one failed write; b comes back, gets only
   the differing MiBs, and the images are equal again.

Every wait is for an event (a node-info state, a count of the driver's writes), never
for time. The guest's writes never fail, except the one that the fault kills its host in.
"""
from __future__ import annotations

import os
import random
import threading

import blake3
import pytest

from conftest import cli, wait_until
from test_failover import TABLES

from test_failover_reprotect import NETNS_READY, EtcdNetns

from pipeline.disk.nbd_client import NbdClient
from pipeline.localpair import HostPair

pytestmark = pytest.mark.slow

MiB = 1 << 20
DISK = 16 * MiB
WRITE = 64 * 1024
#: what each phase of a guest disk driver writes (writes are counted, not timed)
BEFORE_PROOF, SVM_WRITES, UNPROTECTED, DURING_RESYNC, BEFORE_KILL = 30, 10, 20, 20, 5


class GuestDisk(threading.Thread):
    """One host's guest disk driver: 64 KiB writes of fresh data at seeded random places
    of its host's NBD export, one at a time, as many as it is allowed (:meth:`allow`);
    every error is recorded with the write's number. A write fails when its host dies."""

    def __init__(self, export: str, seed: int) -> None:
        super().__init__(name=f"guest-disk-{os.path.basename(export)}", daemon=True)
        self.uri = f"nbd+unix:///?socket={export}"
        self.rng = random.Random(seed)
        self.cond = threading.Condition()
        self.allowed = 0
        self.done = 0
        self.mibs: list[int] | None = None     # None: anywhere on the disk
        self.errors: list[tuple[int, str]] = []
        self.writing = False
        self.stopping = False
        self.client = NbdClient(self.uri, timeout=120)
        self.start()

    def allow(self, n: int, mibs: list[int] | None = None) -> int:
        """Let it write ``n`` more (into ``mibs`` only, if given); the count to wait for."""
        with self.cond:
            self.mibs = mibs
            self.allowed = self.done + n
            self.cond.notify_all()
            return self.allowed

    def pause(self) -> None:
        """No more writes; returns once the one in flight (if any) was answered."""
        with self.cond:
            self.allowed = self.done
            self.cond.wait_for(lambda: not self.writing, timeout=240)

    def wait_done(self, count: int, what: str) -> None:
        wait_until(lambda: self.done >= count or self.errors, timeout=240, what=what)
        assert not self.errors, (what, self.errors)

    def run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopping or self.done < self.allowed)
                if self.stopping:
                    return
                mibs = self.mibs
                self.writing = True
            mib = self.rng.choice(mibs) if mibs else self.rng.randrange(DISK // MiB)
            offset = mib * MiB + self.rng.randrange(MiB // WRITE) * WRITE
            try:
                self.client.write(offset, self.rng.randbytes(WRITE))
            except Exception as e:     # NbdError, EOFError, OSError: recorded, then over
                with self.cond:
                    self.errors.append((self.done + 1, f"{type(e).__name__}: {e}"))
                    self.writing = False
                    self.cond.notify_all()
                return
            with self.cond:
                self.done += 1
                self.writing = False
                self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.join(10)
        self.client.sock.close()


def mib_digests(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    data = data.ljust(DISK, b"\0")
    return [blake3.blake3(data[i:i + MiB]).digest() for i in range(0, DISK, MiB)]


def differing_mibs(a: str, b: str) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(mib_digests(a), mib_digests(b))) if x != y]


def disk_counters(pair: HostPair, host: str) -> dict:
    return pair.node(host).stage("disk").as_dict()


def sync_done(pair: HostPair, host: str) -> dict:
    """``host``'s disk counters once its last sync is done (its END acknowledged: every
    extent it sent is counted by then)."""
    return wait_until(lambda: (c := disk_counters(pair, host))["sync_state"] == 2 and c,
                      timeout=240, what=f"{host}'s disk sync done")


def info_when(pair: HostPair, host: str, pred, what: str, timeout: float = 240) -> dict:
    def look():
        pair.check_alive()
        info = pair.node(host).node_info()
        return info if pred(info) else None
    return wait_until(look, timeout=timeout, what=what)


def protected_again(pair: HostPair, host: str, what: str) -> dict:
    return info_when(pair, host, lambda i: i.get("state") == "protected"
                     and not i.get("awaiting_reprotection"), what)


def became_primary(pair: HostPair, host: str, failovers: int, what: str) -> dict:
    return info_when(pair, host, lambda i: i.get("role") == "primary"
                     and i.get("state") == "unprotected" and i.get("failovers", 0) >= failovers,
                     what)


def images_equal_at_a_checkpoint(pair: HostPair, images: dict[str, str]) -> None:
    """Every driver paused (so nothing is written): a checkpoint where both sides hash
    all of memory commits the disk too; then both image files are the same."""
    proof = pair.prove_memory_equal()
    assert proof["memory_equal"] is True, proof
    assert differing_mibs(images["a"], images["b"]) == []


def disk_tables() -> dict:
    """Each host's own image and export (a unix socket its guest's driver connects to)."""
    disk = {"export_size": DISK, "durable_commit": False, "compare": "off"}
    return {h: {"disk": {**disk, "image": f"{{workdir}}/{h}-disk.img",
                         "export": f"unix:{{workdir}}/{h}-disk.nbd"}} for h in ("a", "b")}


def test_failover_reprotection_and_failback_with_a_replicated_disk(tmp_path):
    """On one machine, with the demo's local witness."""
    pair = HostPair(TABLES, workdir=str(tmp_path / "pair"), role_tables=disk_tables())
    run_disk_cycles(pair)


@pytest.mark.root
@pytest.mark.skipif(not NETNS_READY, reason="needs root, iproute2 and etcd")
def test_failover_reprotection_and_failback_with_a_replicated_disk_netns_etcd(tmp_path):
    """The hosts in two network namespaces (the forwarding link between them, CURVE),
    etcd (TTL 2 s) in a third as the witness."""
    with EtcdNetns(tmp_path) as net:
        pair = HostPair(dict(TABLES, failover=net.failover), workdir=str(tmp_path / "pair"),
                        role_tables=disk_tables(), addresses=net.addresses, netns=net.netns)
        run_disk_cycles(pair)     # (stops the pair)


def run_disk_cycles(pair: HostPair) -> None:
    """The cycles of the module docstring; stops the pair at the end."""
    images = {h: os.path.join(pair.workdir, f"{h}-disk.img") for h in ("a", "b")}
    exports = {h: os.path.join(pair.workdir, f"{h}-disk.nbd") for h in ("a", "b")}
    rng = random.Random(11)
    with open(images["a"], "wb") as f:     # the guest's disk has data; b's starts empty
        f.truncate(DISK)
        for mib in (0, 1, 4, 5, 8, 9, 12):
            f.seek(mib * MiB)
            f.write(rng.randbytes(MiB))
    # each host dies at a named point: right after its guest's k-th write as the primary
    # went into its image (its forward maybe not sent)
    kill_a = BEFORE_PROOF + BEFORE_KILL
    kill_b = UNPROTECTED + DURING_RESYNC + BEFORE_KILL
    drivers: list[GuestDisk] = []
    try:
        # -- 1. a primary, b joins: full disk sync, equal images -------------------------
        pair.start_node("a", fault=f"disk.primary.applied:{kill_a}:killgroup")
        pair.wait_info("state", "unprotected", role="a", timeout=120)
        pair.start_node("b", fault=f"disk.primary.applied:{kill_b}:killgroup")
        pair.wait_protected(timeout=240)
        assert sync_done(pair, "a")["sync_bytes"] == 7 * MiB    # the allocated MiBs
        guest_a = GuestDisk(exports["a"], 1)      # the PVM's disk driver
        guest_b = GuestDisk(exports["b"], 2)      # the SVM's (its writes: the overlay)
        drivers += [guest_a, guest_b]
        guest_a.wait_done(guest_a.allow(BEFORE_PROOF), "a's guest writes, protected")
        guest_b.wait_done(guest_b.allow(SVM_WRITES), "b's guest writes (SVM)")
        images_equal_at_a_checkpoint(pair, images)

        # -- 2. a is lost right after a write reached its image --------------------------
        guest_a.allow(BEFORE_KILL)
        pair.wait_exit("a", timeout=240)     # the fault killed a's whole node
        wait_until(lambda: guest_a.errors, what="a's guest losing its disk with its host")
        assert guest_a.errors and guest_a.errors[0][0] == kill_a, guest_a.errors
        guest_a.stop()
        became_primary(pair, "b", 1, "b taking over and becoming the primary")

        # -- 3. b's guest writes on; a comes back and gets only what differs -------------
        guest_b.wait_done(guest_b.allow(UNPROTECTED), "b's guest writes, unprotected")
        differ = differing_mibs(images["a"], images["b"])
        assert differ, "the images should differ after the failover"
        pair.start_node("a")
        # writes during the re-protection go only where the images differ already, so
        # whatever the moment they land, the sync sends exactly those MiBs
        written = guest_b.allow(DURING_RESYNC, differ)
        info = protected_again(pair, "b", "b protected again by a")
        guest_b.wait_done(written, "b's guest writes during the re-protection")
        assert pair.roles() == {"a": "secondary", "b": "primary"}
        images_equal_at_a_checkpoint(pair, images)
        sync = sync_done(pair, "b")
        assert sync["sync_incremental"] == 1 and sync["sync_total"] == DISK, sync
        assert sync["sync_bytes"] == len(differ) * MiB, (sync, differ)
        assert disk_counters(pair, "a")["sync_checked"] == DISK
        assert info["reprotected_ms"] > 0
        # the sync's progress: node info (the coordinator copies it at each checkpoint)
        # and stats
        entry = info_when(pair, "b", lambda i: i.get("disk_sync", {}).get("state") == "done",
                          "the disk sync done in b's node info")["disk_sync"]
        assert entry["kind"] == "incremental" and entry["total"] == entry["done"] == DISK
        assert entry["sent"] == len(differ) * MiB and entry["rate_mb_s"] >= 0
        stats = cli("stats", "--node", pair.name("b"))
        assert stats.returncode == 0 and "disk sync incremental done: 16 of 16 MiB" \
            in stats.stdout, stats

        # -- 4. failback: b is lost; a's guest writes on through the takeover ------------
        guest_a2 = GuestDisk(exports["a"], 3)     # the SVM's driver on a
        drivers.append(guest_a2)
        guest_a2.wait_done(guest_a2.allow(SVM_WRITES), "a's guest writes (SVM)")
        guest_a2.allow(1 << 30)                   # and on, through all that follows
        guest_b.allow(BEFORE_KILL)
        pair.wait_exit("b", timeout=240)
        wait_until(lambda: guest_b.errors, what="b's guest losing its disk with its host")
        assert guest_b.errors and guest_b.errors[0][0] == SVM_WRITES + kill_b, guest_b.errors
        guest_b.stop()
        became_primary(pair, "a", 1, "a taking over and becoming the primary")
        # a's guest wrote before, during and after the takeover and the change of role
        # on one NBD connection: wait for writes after it, then pause the driver
        after = guest_a2.done + SVM_WRITES
        wait_until(lambda: guest_a2.done >= after or guest_a2.errors, timeout=240,
                   what="a's guest writing as the primary")
        assert not guest_a2.errors, guest_a2.errors
        guest_a2.pause()
        # the driver's one connection was carried over to the primary's side, not reopened
        assert disk_counters(pair, "a")["relinks"] == 1
        assert disk_counters(pair, "a")["client_disconnects"] == 0
        differ = differing_mibs(images["b"], images["a"])
        assert differ
        pair.start_node("b")
        written = guest_a2.allow(DURING_RESYNC, differ)
        protected_again(pair, "a", "a protected again by b")
        guest_a2.wait_done(written, "a's guest writes during the re-protection")
        assert pair.roles() == {"a": "primary", "b": "secondary"}
        images_equal_at_a_checkpoint(pair, images)
        sync = sync_done(pair, "a")
        assert sync["sync_incremental"] == 1 and sync["sync_bytes"] == len(differ) * MiB, \
            (sync, differ)
        assert disk_counters(pair, "a")["forward_errors"] == 0
    finally:
        for d in drivers:
            d.stop()
        pair.stop()


def test_the_demo_rejoins_with_a_disk_and_syncs_only_what_differs():
    """``colo-pipeline demo --rejoin --disk-mb``: two cycles, each ends with equal images
    after an incremental sync, and no failed guest write; the demo's client got exactly
    one answer to each request across both.
    (The demo kills at a moment of its own; nothing here depends on that moment.)"""
    import json
    r = cli("demo", "--pages", "4096", "--duration", "1", "--disk-mb", "32",
            "--kill-primary-after", "0.5", "--rejoin", "--failovers", "2", "--json",
            timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["failovers"] == 2 and out["memory_equal"] and out["disk_equal"], out
    # the demo's client across both cycles: every request exactly one answer
    assert out["client_exactly_once"] and out["client_answers"] == out["client_requests"] > 0, out
    for cycle in out["cycles"]:
        assert cycle["disk_equal"] and cycle["disk_sync_incremental"], cycle
        assert cycle["disk_write_errors"] == 0 and cycle["disk_writes"] > 0, cycle
        assert 0 < cycle["disk_sync_bytes"] <= 32 * MiB, cycle   # (exact: the test above)


def test_run_draws_the_disk_sync_bar_on_a_terminal(tmp_path):
    """``colo-pipeline run`` of a primary with a disk, on a terminal: when a secondary
    joins, the disk sync's bar (pipeline/disk/progress.py) is drawn and ends at 100%."""
    import re
    pair = HostPair(TABLES, workdir=str(tmp_path / "pair"), role_tables=disk_tables())
    out = bytearray()

    def read_terminal(fd: int) -> None:   # all the time: a full terminal would block the node
        try:
            while data := os.read(fd, 65536):
                out.extend(data)
        except OSError:       # the node and the test are done with it
            pass
    try:
        with open(os.path.join(pair.workdir, "a-disk.img"), "wb") as f:
            f.truncate(DISK)
            f.seek(3 * MiB)
            f.write(random.Random(5).randbytes(2 * MiB))
        pair.start_node("a", tty=True)
        threading.Thread(target=read_terminal, args=(pair.ttys["a"],), daemon=True).start()
        pair.wait_info("state", "unprotected", role="a", timeout=120)
        pair.start_node("b")
        pair.wait_protected(timeout=240)
        sync_done(pair, "a")
        done = re.compile(rb"\rdisk sync \(full\) \[#{40}\] 100\.0%  2/2 MiB")
        wait_until(lambda: done.search(bytes(out)), timeout=60,
                   what="the disk sync's bar at 100%")
    finally:
        pair.stop()
        pair.cleanup()
