"""Settings of the network comparator (the ``[net]`` table of the config file)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

#: QEMU's NET_BUFSIZE (4096 + 65536): the largest frame the socket framing carries
MAX_FRAME_BYTES = 69632


@dataclass(frozen=True)
class NetSettings:
    """How the comparator compares and how much it may hold.

    Addresses use the forms ``tcp:HOST:PORT``, ``unix:PATH`` (listen, one peer,
    QEMU's socket framing), ``packet:IFNAME`` (AF_PACKET) and ``pcap:PATH``.
    An empty address means the role is not used.
    """

    compare_timeout_ms: int = field(default=3000, metadata={"doc": (
        "A PVM frame unmatched this long requests a checkpoint (QEMU's default: 3000).")})
    expired_scan_ms: int = field(default=100, metadata={"doc": (
        "How often held frames are checked for the timeout (QEMU's expired_scan_cycle).")})
    max_connections: int = field(default=4096, metadata={"doc": (
        'Connections tracked at once; when full, idle connections are evicted first.')})
    max_queue_frames: int = field(default=1024, metadata={"doc": (
        "Frames held per connection and side (QEMU's max_queue_size: 1024). At the "
        "bound the comparator asks for a checkpoint and stops reading the PVM until it "
        "commits (the guest's output backs up); it drops none of the PVM's frames.")})
    max_fragment_datagrams: int = field(default=256, metadata={"doc": (
        'Incomplete IPv4 datagrams held for reassembly per side.')})
    vnet_hdr: bool = field(default=False, metadata={"doc": (
        "The socket framing carries a vnet header length (QEMU's vnet_hdr_support).")})
    rewrite_secondary: bool = field(default=False, metadata={"doc": (
        "Rewrite the SVM's TCP sequence numbers into the PVM's space (filter-rewriter); "
        "off when the secondary stream is already rewritten (QEMU's filter-rewriter).")})
    primary_in: str = field(default="", metadata={"doc": (
        'Where PVM frames come from.')})
    secondary_in: str = field(default="", metadata={"doc": (
        'Where SVM frames come from.')})
    outdev: str = field(default="", metadata={"doc": (
        'Where released PVM frames go (towards the client).')})
    client_in: str = field(default="", metadata={"doc": (
        'Client frames to mirror to both guests (optional).')})
    primary_out: str = field(default="", metadata={"doc": (
        'Where mirrored client frames go to the PVM / the SVM (optional).')})
    secondary_out: str = field(default="", metadata={"doc": (
        'Where mirrored client frames go to the PVM / the SVM (optional).')})

    def __post_init__(self) -> None:
        def positive(key: str) -> None:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"net.{key} must be a positive integer, got {value!r}")

        for key in ("compare_timeout_ms", "expired_scan_ms", "max_connections",
                    "max_queue_frames", "max_fragment_datagrams"):
            positive(key)
        for key in ("vnet_hdr", "rewrite_secondary"):
            if not isinstance(getattr(self, key), bool):
                # ValueError for every bad setting: the config loader reports them alike
                raise ValueError(  # noqa: TRY004
                    f"net.{key} must be true or false, got {getattr(self, key)!r}")
        for key in ("primary_in", "secondary_in", "outdev", "client_in", "primary_out",
                    "secondary_out"):
            value = getattr(self, key)
            if not isinstance(value, str):
                raise ValueError(  # noqa: TRY004
                    f"net.{key} must be an address string, got {value!r}")
            if value and value.split(":", 1)[0] not in ("tcp", "unix", "packet", "pcap"):
                raise ValueError(f"net.{key}: unknown address {value!r} "
                                 "(use tcp:HOST:PORT, unix:PATH, packet:IFNAME or pcap:PATH)")

        streams = [(key, getattr(self, key)) for key in ("primary_in", "secondary_in", "outdev")
                   if getattr(self, key).split(":", 1)[0] in ("tcp", "unix")]
        for i, (key, value) in enumerate(streams):
            for other, other_value in streams[:i]:
                if value == other_value:
                    raise ValueError(f"net.{key}: {value!r} is already net.{other} "
                                     "(each socket role needs its own address)")

    @classmethod
    def from_dict(cls, table: dict) -> NetSettings:
        """Build from a config table; unknown keys are an error naming the key."""
        known = {f.name for f in fields(cls)}
        for key in table:
            if key not in known:
                raise ValueError(f"net.{key}: unknown setting (known: {', '.join(sorted(known))})")
        return cls(**table)
