"""Settings of the network comparator (the ``[net]`` table of the config file), in the
one style of :mod:`pipeline.schema`."""
from __future__ import annotations

from dataclasses import dataclass, fields

from pipeline.schema import Section, SettingError
from pipeline.schema import setting as _f

#: QEMU's NET_BUFSIZE (4096 + 65536): the largest frame the socket framing carries
MAX_FRAME_BYTES = 69632


_ADDRESS = dict(pattern=r"(|(tcp|unix|packet|pcap):.*)",
                pattern_doc="empty, or tcp:HOST:PORT, unix:PATH, packet:IFNAME or pcap:PATH")


@dataclass(frozen=True)
class NetSettings(Section):
    """How the comparator compares and how much it may hold.

    Addresses use the forms ``tcp:HOST:PORT``, ``unix:PATH`` (listen, one peer,
    QEMU's socket framing), ``packet:IFNAME`` (AF_PACKET) and ``pcap:PATH``.
    An empty address means the role is not used.
    """

    SECTION = "net"

    release: str = _f("compare", (
        "When a PVM frame may go to the client. compare: once the SVM sent the same "
        "(COLO), or at the commit of its epoch; a divergence asks for a checkpoint. "
        "commit: at the commit of the epoch that produced it, in order, never earlier, "
        "nothing compared (Remus-style buffering: for a guest too nondeterministic for "
        "COLO; every reply waits for a checkpoint: checkpoint.max_interval_ms, 25 ms by "
        "default with commit)."), choices=("compare", "commit"))
    compare_timeout_ms: int = _f(3000, (
        "A PVM frame unmatched this long requests a checkpoint (QEMU's default: 3000)."), min=1)
    expired_scan_ms: int = _f(100, (
        "How often held frames are checked for the timeout (QEMU's expired_scan_cycle)."), min=1)
    max_connections: int = _f(4096, (
        'Connections tracked at once; when full, idle connections are evicted first.'), min=1)
    max_queue_frames: int = _f(1024, (
        "Frames held per connection and side (QEMU's max_queue_size: 1024). At the "
        "bound the comparator asks for a checkpoint and stops reading the PVM until it "
        "commits (the guest's output backs up); it drops none of the PVM's frames. With "
        "release = commit the bound is on all PVM frames waiting for a commit."), min=1)
    max_fragment_datagrams: int = _f(256, (
        'Incomplete IPv4 datagrams held for reassembly per side.'), min=1)
    vnet_hdr: bool = _f(False, (
        "The socket framing carries a vnet header length (QEMU's vnet_hdr_support)."))
    rewrite_secondary: bool = _f(False, (
        "Rewrite the SVM's TCP sequence numbers into the PVM's space (filter-rewriter); "
        "off when the secondary stream is already rewritten (QEMU's filter-rewriter)."))
    primary_in: str = _f("", "Where PVM frames come from.", **_ADDRESS)
    secondary_in: str = _f("", "Where SVM frames come from.", **_ADDRESS)
    outdev: str = _f("", "Where released PVM frames go (towards the client).", **_ADDRESS)
    client_in: str = _f("", "Client frames to mirror to both guests (optional).", **_ADDRESS)
    primary_out: str = _f("", "Where mirrored client frames go to the PVM / the SVM "
                          "(optional).", **_ADDRESS)
    secondary_out: str = _f("", "Where mirrored client frames go to the PVM / the SVM "
                            "(optional).", **_ADDRESS)
    redirector_in: str = _f("", (
        "A real guest NIC behind this host's redirector (pipeline/net/redirector.py), "
        "node.role auto: after this host's secondary took over, the comparator of the "
        "primary it becomes takes the guest's frames here (the redirector's --primary-in, "
        "tcp:HOST:PORT or unix:PATH on this host) instead of at primary_in, and the node "
        "tells the redirector to hand the guest's interface over to it (SIGUSR2 to "
        "failover.redirector_pid_file). With a sim guest (the network-namespace lab) its "
        "output ports are then unused: the guest's network is the real interfaces'."),
        pattern=r"(|(tcp|unix):.*)", pattern_doc="empty, or tcp:HOST:PORT or unix:PATH")
    redirector_out: str = _f("", (
        "With redirector_in: where that comparator sends the clients' frames for the guest "
        "(the redirector's --primary-out), instead of primary_out."),
        pattern=r"(|(tcp|unix):.*)", pattern_doc="empty, or tcp:HOST:PORT or unix:PATH")
    redirector_by_node: bool = _f(False, (
        "With redirector_in and node.role auto: the node runs the redirector itself "
        "(python -m pipeline.net.redirector) from when it starts as the secondary until it "
        "stops, across a takeover: --svm the interface of primary_in, --uplink that of "
        "client_in (both packet:), --mirror-from the peer's secondary_out (its port on "
        "peer.address's host), --compare-to the peer's secondary_in, --primary-in/-out "
        "redirector_in/out, --offsets-in/-out redirector_offsets, --pid-file "
        "failover.redirector_pid_file. Its log lines go to the node's log, its counters "
        "too when it stops. False: the operator runs it (docs/deployment.md)."))
    redirector_control: str = _f("", (
        "With redirector_in, a guest whose SVM takes the PVM's state at each checkpoint (a "
        "real VM): the redirector's --control socket (a path on this host). The secondary "
        "node says 'checkpoint' there after each applied or rolled-back epoch, the SVM still "
        "paused, and the redirector drops the offsets it learnt (both guests are in the "
        "PVM's space from then on) and keeps the carried ones. Empty: offsets are never "
        "reset (the network-namespace lab, whose kernel-stack guests no checkpoint copies)."))
    redirector_offsets: str = _f("", (
        "With redirector_in: this host's file of carried TCP sequence offsets (the "
        "connections the clients opened before a failover; the redirector's --offsets-out "
        "and --offsets-in). As primary the node sends its content to each new secondary "
        "with the full sync; as secondary it writes what it received there and tells the "
        "redirector to load it (SIGHUP). Removed at the node's start: a fresh guest has "
        "none."))

    def __post_init__(self) -> None:
        super().__post_init__()
        streams = [(key, getattr(self, key)) for key in ("primary_in", "secondary_in", "outdev")
                   if getattr(self, key).split(":", 1)[0] in ("tcp", "unix")]
        for i, (key, value) in enumerate(streams):
            for other, other_value in streams[:i]:
                if value == other_value:
                    raise SettingError(f"net.{key}", f"{value!r} is already net.{other}",
                                       "each socket role with its own address")
        if bool(self.redirector_in) != bool(self.redirector_out):
            key = "net.redirector_out" if self.redirector_in else "net.redirector_in"
            raise SettingError(key, "missing: the redirector's two streams go together",
                               "both net.redirector_in and net.redirector_out, or neither")
        if self.redirector_in and self.redirector_in == self.redirector_out:
            raise SettingError("net.redirector_out", f"{self.redirector_out!r} is already "
                               "net.redirector_in", "each stream with its own address")
        if self.redirector_control and not self.redirector_in:
            raise SettingError("net.redirector_control", "set without net.redirector_in",
                               "net.redirector_in and net.redirector_out too, or leave it "
                               "empty")
        if self.redirector_offsets and not self.redirector_in:
            raise SettingError("net.redirector_offsets", "set without net.redirector_in",
                               "net.redirector_in and net.redirector_out too (a real guest "
                               "NIC behind the redirector), or leave it empty")

    @classmethod
    def from_dict(cls, table: dict) -> NetSettings:
        """Build from a config table; unknown keys are an error naming the key."""
        known = {f.name for f in fields(cls)}
        for key in table:
            if key not in known:
                raise SettingError(f"net.{key}", "unknown key", "one of "
                                   + ", ".join(sorted(known)))
        return cls(**table)
