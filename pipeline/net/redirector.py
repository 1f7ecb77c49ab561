"""The secondary host's side of the guest's network: QEMU's filter-redirector and
filter-rewriter on the SVM's netdev, and what COLO does with them at failover.

While the pair is protected the SVM is not on the clients' network:

* the client frames the primary's comparator mirrors (its ``secondary_out``) come in on
  one stream and are injected into the SVM's interface, their ACKs (SACK edges, TSecr)
  moved into the SVM's sequence space;
* the SVM's frames go out on another stream to the comparator's ``secondary_in``, their
  sequence numbers (and TSval) moved into the PVM's space.

The offsets are learnt here, on the secondary's host, from what passes: the SVM's SYN-ACK
(its ISN) and the client's ACK that completes the handshake, which acknowledges the PVM's
ISN + 1 (:meth:`pipeline.net.rewriter.SeqRewriter.observe_client`). That is why the
rewriting lives on this host and not in the comparator: it must outlive the primary.

**Failover** (:meth:`SecondaryRedirector.failover`; the standalone process takes SIGUSR1,
as QEMU takes ``x-colo-lost-heartbeat``: the node's takeover sends it, to the pid in
``failover.redirector_pid_file``, which ``--pid-file`` writes; or an operator): the SVM's interface is bridged to the clients' network
(``uplink``): client frames for the guest's MAC go into the SVM, the SVM's frames go out
to the clients, both through the same rewriter, so a TCP connection the client opened
with the PVM goes on with the SVM. The guest's MAC is announced (RARP, as QEMU's
``qemu_announce_self``) so the clients' switch learns where it is now.

What the client then sees on a TCP connection (docs/deployment.md, "What clients see
across a failover"): every byte once, in order. Segments the lost comparator held are
retransmitted by the SVM's own TCP stack (they are in its send queue, unacknowledged);
segments the comparator released and the SVM sends again are below the client's
``rcv_nxt`` and dropped by the client's stack; requests the client sent into the dead
host are retransmitted by the client's stack.

**Re-protection** (:meth:`SecondaryRedirector.reprotect`; SIGUSR2 to the standalone
process: the survivor's node sends it once its primary's stages run, to the pid in
``failover.redirector_pid_file``), after a failover, once this host's new primary comparator listens on
``primary_in`` and ``primary_out`` (its PVM streams, on this host): the redirector stops
bridging and hands the guest's interface over to that comparator, without a restart that
would drop the guest's connections. It still sits between the guest and the comparator,
because the guest goes on in the SVM's sequence space on every connection opened before
the failover: the guest's frames go to ``primary_in`` moved into the clients' (the old
PVM's) space, the client frames the comparator sends to ``primary_out`` go into the guest
moved back. The comparator owns the clients' network (``uplink``) from then on. The
offsets of those connections are written to ``offsets_out`` for the new secondary's
redirector (``--offsets-in``): its SVM, synced from this guest, is in the same space.

**Carried offsets** (:meth:`SecondaryRedirector.load_offsets_file`; SIGHUP to the
standalone process): the new secondary's node receives the survivor's offsets with the
full sync, writes them to its ``net.redirector_offsets`` and sends SIGHUP; the redirector
then loads ``--offsets-in`` (all rows or none). At start it loads the file only if it is
there (the node removes it when it starts: a fresh guest has none).

**Checkpoints** (``--control PATH``, a unix socket; the secondary node's coordinator,
``net.redirector_control``, sends ``checkpoint`` after each applied or rolled-back epoch
while the SVM is still paused, and waits for the answer before it resumes it): the SVM now
holds the PVM's state, in the PVM's sequence space on every connection the two guests
opened while protected, so the offsets learnt here are dropped; the carried ones
(``--offsets-in``) stay, both guests being in the survivor guest's space on those. The
frames the SVM sent before the pause are read and moved first, with the old offsets.
QEMU's filter-rewriter does the same at its checkpoint event.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading

from pipeline.net.adapters import PacketSocket, StreamClient
from pipeline.net.rewriter import SeqRewriter

log = logging.getLogger(__name__)

ETH_P_RARP = 0x8035
BROADCAST = b"\xff" * 6
SEND_STUCK_S = 5.0

COUNTERS = ("client_frames_in", "svm_frames_out", "frames_to_clients",
            "client_frames_direct", "frames_not_for_guest", "announcements", "failovers",
            "reprotections", "reprotect_refused", "offsets_loaded", "offsets_exported",
            "offsets_refused", "frames_rewritten", "checkpoints", "offsets_reset")


def rarp_announce(mac: bytes) -> bytes:
    """The frame QEMU sends to announce a guest's MAC after migration or failover."""
    return (BROADCAST + mac + struct.pack("!H", ETH_P_RARP)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + mac + bytes(4) + mac + bytes(4)
            + bytes(18))


class SecondaryRedirector:
    """``svm``: the SVM's interface (``packet:IFNAME``'s name); ``mirror_from`` and
    ``compare_to``: the primary comparator's ``secondary_out`` and ``secondary_in``
    (``tcp:HOST:PORT``); ``uplink``: this host's interface on the clients' network, used
    from the failover on; ``primary_in``, ``primary_out``: this host's new primary
    comparator's PVM streams, from a re-protection on, and ``offsets_out``: where the
    re-protection writes the offsets for the new secondary's redirector; ``offsets``: rows
    of :meth:`SeqRewriter.export_offsets` to start with (this redirector serves a new
    secondary whose SVM was synced from a survivor's guest)."""

    def __init__(self, svm: str, mirror_from: str, compare_to: str, uplink: str,
                 connect_timeout: float = 30.0, primary_in: str = "", primary_out: str = "",
                 offsets_out: str = "", offsets: list | None = None,
                 offsets_in: str = "", control: str = "") -> None:
        self.rewriter = SeqRewriter()
        self.counters = dict.fromkeys(COUNTERS, 0)
        if offsets:
            self.counters["offsets_loaded"] = self.rewriter.load_offsets(offsets)
        self.svm = PacketSocket(svm)
        self.uplink_name = uplink
        self.uplink: PacketSocket | None = None
        self.primary_in, self.primary_out, self.offsets_out = primary_in, primary_out, \
            offsets_out
        self.offsets_in = offsets_in
        self._load_asked = threading.Event()
        self.control: socket.socket | None = None       # the node's checkpoint notices
        self.control_conn: socket.socket | None = None
        self._control_buf = b""
        if control:
            if os.path.exists(control):
                os.unlink(control)
            self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.control.bind(control)
            self.control.listen(1)
        self.connect_timeout = connect_timeout
        self.guest_mac: bytes | None = None
        self.failed_over = threading.Event()
        self._failover_asked = threading.Event()
        self.reprotected = threading.Event()
        self._reprotect_asked = threading.Event()
        self.mirror = StreamClient(mirror_from, timeout=connect_timeout)
        self.compare = StreamClient(compare_to, timeout=connect_timeout)
        # a comparator host that vanished without closing its end must not block the SVM's
        # path for good: a send stuck this long counts as the stream lost
        self.compare.sock.settimeout(SEND_STUCK_S)

    # -- the two modes -----------------------------------------------------------------
    def _from_svm(self) -> None:
        c = self.counters
        for frame, vnet in self.svm.recv():
            if self.guest_mac is None:
                self.guest_mac = frame[6:12]      # the guest's own MAC, from its first frame
            frame = self.rewriter.from_secondary(frame, vnet)
            if self.uplink is not None:
                self.uplink.send(frame, vnet)
                c["frames_to_clients"] += 1
            elif self.compare is not None:
                try:
                    self.compare.send(frame, vnet)
                except OSError as exc:
                    # the comparator's host is gone: the frame is lost as on a dead link
                    # (TCP retransmits it after the failover)
                    log.warning("redirector: comparator stream lost: %s", exc)
                    self.compare.close()
                    self.compare = None
            c["svm_frames_out"] += 1

    def _to_svm(self, frames: list, direct: bool) -> None:
        c = self.counters
        for frame, vnet in frames:
            if direct and frame[vnet:vnet + 6] not in (self.guest_mac, BROADCAST):
                c["frames_not_for_guest"] += 1
                continue
            self.rewriter.observe_client(frame, vnet)
            self.svm.send(self.rewriter.to_secondary(frame, vnet), vnet)
            c["client_frames_direct" if direct else "client_frames_in"] += 1

    def failover(self) -> None:
        """From any thread (a signal handler too): take over at the next loop turn."""
        self._failover_asked.set()

    def _do_failover(self) -> None:
        """Bridge the SVM to the clients' network; announce the guest's MAC there."""
        for s in (self.mirror, self.compare):
            if s is not None:
                s.close()
        self.mirror = self.compare = None
        self.uplink = PacketSocket(self.uplink_name)
        if self.guest_mac is not None:
            self.uplink.send(rarp_announce(self.guest_mac))
            self.counters["announcements"] += 1
        self.counters["failovers"] += 1
        self.failed_over.set()
        log.warning("redirector: failover: the SVM's interface is bridged to %s",
                    self.uplink_name)

    def reprotect(self) -> None:
        """From any thread (a signal handler too): hand the guest's interface to this
        host's new primary comparator at the next loop turn."""
        self._reprotect_asked.set()

    def _do_reprotect(self) -> None:
        """Connect to the comparator's PVM streams, then switch: all of it, or (nothing
        to hand over, no comparator) nothing, logged and counted; the guest stays bridged."""
        self._reprotect_asked.clear()
        if not self.failed_over.is_set() or self.reprotected.is_set():
            why = ("it never failed over (its SVM is compared already)"
                   if not self.failed_over.is_set() else "it was re-protected already")
            log.error("redirector: re-protection refused: %s", why)
            self.counters["reprotect_refused"] += 1
            return
        if not (self.primary_in and self.primary_out):
            log.error("redirector: re-protection refused: no --primary-in/--primary-out "
                      "(the new primary comparator's streams)")
            self.counters["reprotect_refused"] += 1
            return
        try:
            compare = StreamClient(self.primary_in, timeout=self.connect_timeout)
        except (ConnectionError, OSError) as exc:
            log.error("redirector: re-protection refused: the comparator's %s: %s",
                      self.primary_in, exc)
            self.counters["reprotect_refused"] += 1
            return
        try:
            mirror = StreamClient(self.primary_out, timeout=self.connect_timeout)
        except (ConnectionError, OSError) as exc:
            compare.close()
            log.error("redirector: re-protection refused: the comparator's %s: %s",
                      self.primary_out, exc)
            self.counters["reprotect_refused"] += 1
            return
        compare.sock.settimeout(SEND_STUCK_S)
        rows = self.rewriter.export_offsets()
        if self.offsets_out:
            with open(self.offsets_out + ".tmp", "w") as fh:
                json.dump(rows, fh)
            os.replace(self.offsets_out + ".tmp", self.offsets_out)   # whole, or not there
        self.counters["offsets_exported"] = len(rows)
        self.uplink.close()          # the comparator reads and writes the clients' side now
        self.uplink = None
        self.compare, self.mirror = compare, mirror
        self.counters["reprotections"] += 1
        self.reprotected.set()
        log.warning("redirector: re-protected: the guest's frames go to the comparator's %s "
                    "(%d connections' offsets kept)", self.primary_in, len(rows))

    def load_offsets_file(self) -> None:
        """From any thread (a signal handler too): load ``offsets_in`` at the next loop
        turn (the node wrote the offsets it received with the full sync there)."""
        self._load_asked.set()

    def _do_load_offsets(self) -> None:
        """All rows of ``offsets_in`` into the rewriter, or (unreadable, malformed) none,
        logged and counted."""
        self._load_asked.clear()
        try:
            with open(self.offsets_in) as fh:
                rows = json.load(fh)
            if not isinstance(rows, list):
                raise ValueError("not a JSON list of offsets rows")
            n = self.rewriter.load_offsets(rows)
        except (OSError, ValueError) as exc:
            log.error("redirector: offsets not loaded from %r: %s", self.offsets_in, exc)
            self.counters["offsets_refused"] += 1
            return
        self.counters["offsets_loaded"] += n
        log.warning("redirector: %d connections' offsets loaded from %s", n, self.offsets_in)

    def checkpoint(self) -> tuple[int, int]:
        """The SVM is paused with the PVM's state: the frames it sent before go on with
        the old offsets, then the learnt offsets are dropped (the carried ones kept)."""
        while select.select([self.svm.fileno()], [], [], 0)[0]:
            before = self.counters["svm_frames_out"]
            self._from_svm()
            if self.counters["svm_frames_out"] == before:
                break
        reset, kept = self.rewriter.reset_learnt()
        self.counters["checkpoints"] += 1
        self.counters["offsets_reset"] += reset
        return reset, kept

    def _on_control(self) -> None:
        """A line from the node: ``checkpoint`` (answered ``ok RESET KEPT``); anything
        else is answered ``error ...`` and changes nothing."""
        try:
            data = self.control_conn.recv(4096)
        except OSError:
            data = b""
        if not data:
            self.control_conn.close()
            self.control_conn, self._control_buf = None, b""
            return
        self._control_buf += data
        while b"\n" in self._control_buf:
            line, self._control_buf = self._control_buf.split(b"\n", 1)
            if line.strip() == b"checkpoint":
                reset, kept = self.checkpoint()
                answer = f"ok {reset} {kept}\n"
            else:
                log.error("redirector: unknown control line %r", line[:80])
                answer = f"error unknown command {line[:80]!r}\n"
            try:
                self.control_conn.sendall(answer.encode())
            except OSError:
                pass

    def run_once(self, timeout: float) -> None:
        if self._load_asked.is_set():
            self._do_load_offsets()
        if self._failover_asked.is_set() and not self.failed_over.is_set():
            self._do_failover()
        if self._reprotect_asked.is_set():
            self._do_reprotect()
        sources = [self.svm] + [s for s in (self.mirror, self.uplink, self.control,
                                            self.control_conn) if s is not None]
        ready = select.select([s.fileno() for s in sources], [], [], timeout)[0]
        if self.control is not None and self.control.fileno() in ready:
            conn, _ = self.control.accept()
            if self.control_conn is not None:      # one node: the newest connection wins
                self.control_conn.close()
            self.control_conn, self._control_buf = conn, b""
        elif self.control_conn is not None and self.control_conn.fileno() in ready:
            self._on_control()
        if self.svm.fileno() in ready:
            self._from_svm()
        if self.uplink is not None and self.uplink.fileno() in ready:
            self._to_svm(self.uplink.recv(), direct=True)
        if self.mirror is not None and self.mirror.fileno() in ready:
            try:
                self._to_svm(self.mirror.recv(), direct=False)
            except (ConnectionError, OSError) as exc:
                log.warning("redirector: mirror stream lost: %s", exc)
                self.mirror.close()
                self.mirror = None

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once(0.05)

    def close(self) -> None:
        for s in (self.svm, self.uplink, self.mirror, self.compare, self.control,
                  self.control_conn):
            if s is not None:
                s.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.net.redirector``: run until SIGTERM; SIGUSR1 fails over,
    SIGUSR2 re-protects, SIGHUP loads ``--offsets-in``. Prints ``ready`` once both streams are connected and the counters as JSON at exit."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.net.redirector",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--svm", required=True, metavar="IFNAME",
                        help="the SVM's interface (its tap or veth on this host)")
    parser.add_argument("--mirror-from", required=True, metavar="ADDR",
                        help="the comparator's secondary_out (tcp:HOST:PORT)")
    parser.add_argument("--compare-to", required=True, metavar="ADDR",
                        help="the comparator's secondary_in (tcp:HOST:PORT)")
    parser.add_argument("--uplink", required=True, metavar="IFNAME",
                        help="this host's interface on the clients' network (after failover)")
    parser.add_argument("--primary-in", default="", metavar="ADDR",
                        help="after a failover, on SIGUSR2 (re-protection): this host's new "
                             "primary comparator's primary_in, where the guest's frames go")
    parser.add_argument("--primary-out", default="", metavar="ADDR",
                        help="... and its primary_out, the client frames for the guest")
    parser.add_argument("--offsets-out", default="", metavar="PATH",
                        help="the re-protection writes the offsets of the connections "
                             "opened before the failover there (JSON), for --offsets-in")
    parser.add_argument("--offsets-in", default="", metavar="PATH",
                        help="start with these offsets if the file is there, and load it "
                             "again on SIGHUP: a new secondary whose SVM was synced from a "
                             "survivor's guest (the survivor's --offsets-out, which the "
                             "node carries with the full sync: net.redirector_offsets)")
    parser.add_argument("--control", default="", metavar="PATH",
                        help="a unix socket where the secondary node says 'checkpoint' at "
                             "each applied epoch, the SVM paused: the learnt offsets are "
                             "dropped, the carried ones kept (net.redirector_control)")
    parser.add_argument("--pid-file", metavar="PATH",
                        help="write this process's pid there once ready (removed at exit): "
                             "the node's failover.redirector_pid_file, so its takeover "
                             "sends the SIGUSR1")
    args = parser.parse_args(argv)
    # as the node logs (a node-run redirector writes into the node's log)
    logging.basicConfig(level="WARNING", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s redirector pipeline.net.redirector: "
                               "%(message)s")
    from pipeline.signals import report_fatal_signals
    report_fatal_signals()      # a native crash names its frames in the node's log
    offsets = None
    if args.offsets_in and os.path.exists(args.offsets_in):
        try:
            with open(args.offsets_in) as fh:
                offsets = json.load(fh)
        except (OSError, ValueError) as exc:
            parser.error(f"--offsets-in {args.offsets_in}: {exc}")
        if not isinstance(offsets, list):
            parser.error(f"--offsets-in {args.offsets_in}: not a JSON list of offsets rows")
    try:
        r = SecondaryRedirector(args.svm, args.mirror_from, args.compare_to, args.uplink,
                                primary_in=args.primary_in, primary_out=args.primary_out,
                                offsets_out=args.offsets_out, offsets=offsets,
                                offsets_in=args.offsets_in, control=args.control)
    except ValueError as exc:
        parser.error(f"--offsets-in {args.offsets_in}: {exc}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: r.failover())
    signal.signal(signal.SIGUSR2, lambda *_: r.reprotect())
    signal.signal(signal.SIGHUP, lambda *_: r.load_offsets_file())
    if args.pid_file:
        with open(args.pid_file + ".tmp", "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(args.pid_file + ".tmp", args.pid_file)   # whole, or not there
    print("ready", flush=True)
    try:
        r.run(stop)
    finally:
        r.counters["frames_rewritten"] = r.rewriter.rewritten
        print(json.dumps(r.counters), flush=True)
        r.close()
        if args.pid_file:
            try:
                os.unlink(args.pid_file)
            except FileNotFoundError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
