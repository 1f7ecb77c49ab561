"""Settings of the replicated disk (the ``[disk]`` table of a node's config).

One frozen dataclass for both sides: the primary uses ``forward`` as the address
it connects to, the secondary as the address it binds. Validation raises
``ValueError`` naming the offending key, so the config loader can add the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

COMPARE_MODES = ("off", "checkpoint")
#: NBD's own ceiling on one request's payload; we never advertise more
NBD_MAX_REQUEST = 32 * 1024 * 1024


def parse_export_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """``"127.0.0.1:10809"`` → ``("tcp", ("127.0.0.1", 10809))``; ``"unix:/p"`` → ``("unix", "/p")``."""
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        if not path:
            raise ValueError(f"disk export address {address!r}: empty unix socket path")
        return "unix", path
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"disk export address {address!r}: expected HOST:PORT or unix:PATH")
    return "tcp", (host, int(port))


@dataclass(frozen=True)
class DiskSettings:
    """The ``[disk]`` table. ``image`` empty (the default): no replicated disk."""
    image: str = field(default="", metadata={"doc": (
        "The disk image this host serves (primary: the PVM's disk; secondary: the image "
        'as of the last checkpoint). Created sparse at ``export_size`` if missing.')})
    export_size: int = field(default=0, metadata={"doc": (
        'Bytes the NBD export reports; a multiple of ``block_size``.')})
    block_size: int = field(default=4096, metadata={"doc": (
        "NBD minimum/preferred block size and the overlay's granularity (power of two, "
        '512..64 KiB).')})
    max_request: int = field(default=NBD_MAX_REQUEST, metadata={"doc": (
        'Largest single NBD request accepted (bytes, multiple of block_size, ≤ 32 MiB).')})
    export: str = field(default="127.0.0.1:10809", metadata={"doc": (
        'Where the NBD export listens: ``HOST:PORT`` or ``unix:PATH``.')})
    forward: str = field(default="tcp://127.0.0.1:10810", metadata={"doc": (
        'ZeroMQ address of the write forwarding link (primary connects, secondary binds).')})
    forward_window: int = field(default=64, metadata={"doc": (
        'Forwarded writes in flight per NBD connection before the primary stops reading '
        'new requests (back-pressure on the guest when the secondary is slow).')})
    forward_timeout_ms: int = field(default=10_000, metadata={"doc": (
        "How long the primary waits for the secondary's ack before failing a write with "
        'EIO.')})
    compare: str = field(default="checkpoint", metadata={"doc": (
        '``"off"``: never compare write streams; ``"checkpoint"``: a divergence requests '
        'one.'), "choices": COMPARE_MODES})
    compare_timeout_ms: int = field(default=2000, metadata={"doc": (
        'An unmatched write older than this counts as a divergence (secondary side).')})
    state_dir: str = field(default="", metadata={"doc": (
        'Directory of the overlay, the PVM write buffer and the commit journal '
        '(secondary); empty = ``<image>.colo/`` next to the image.')})
    overlay_max_bytes: int = field(default=4 * 1024**3, metadata={"doc": (
        'SVM overlay ceiling: writes to new blocks beyond it fail with ENOSPC.')})
    buffer_max_bytes: int = field(default=4 * 1024**3, metadata={"doc": (
        'Buffered-but-uncommitted PVM write ceiling: forwarded writes beyond it are '
        'refused.')})
    durable_commit: bool = field(default=True, metadata={"doc": (
        'Secondary: fsync buffer logs, image and journal at every commit (survives a '
        'power loss of the secondary host). false: survives a killed stage process only — '
        'a lost secondary host is replaced by a full resync in COLO anyway — and commits '
        'are cheaper.')})

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"disk.{key}: {getattr(self, key)!r} {why}")

        if self.image == "" and self.export_size == 0:
            return                     # no [disk] table: no replicated disk
        if not isinstance(self.image, str) or not self.image:
            raise bad("image", "must be a non-empty path")
        bs = self.block_size
        if not isinstance(bs, int) or bs < 512 or bs > 65536 or bs & (bs - 1):
            raise bad("block_size", "must be a power of two between 512 and 65536")
        if not isinstance(self.export_size, int) or self.export_size <= 0 \
                or self.export_size % bs:
            raise bad("export_size", f"must be a positive multiple of block_size ({bs})")
        mr = self.max_request
        if not isinstance(mr, int) or mr < bs or mr > NBD_MAX_REQUEST or mr % bs:
            raise bad("max_request",
                      f"must be a multiple of block_size between {bs} and {NBD_MAX_REQUEST}")
        try:
            parse_export_address(self.export)
        except ValueError as e:
            raise bad("export", str(e)) from None
        if not isinstance(self.forward, str) or not self.forward.startswith(("tcp://", "ipc://")):
            raise bad("forward", "must be a tcp:// or ipc:// ZeroMQ address")
        if not isinstance(self.forward_window, int) or not 1 <= self.forward_window <= 4096:
            raise bad("forward_window", "must be an integer in 1..4096")
        if not isinstance(self.forward_timeout_ms, int) or self.forward_timeout_ms <= 0:
            raise bad("forward_timeout_ms", "must be a positive integer")
        if self.compare not in COMPARE_MODES:
            raise bad("compare", f"must be one of {COMPARE_MODES}")
        if not isinstance(self.compare_timeout_ms, int) or self.compare_timeout_ms <= 0:
            raise bad("compare_timeout_ms", "must be a positive integer")
        if not isinstance(self.state_dir, str):
            raise bad("state_dir", "must be a path string")
        if not isinstance(self.durable_commit, bool):
            raise bad("durable_commit", "must be true or false")
        for key in ("overlay_max_bytes", "buffer_max_bytes"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < bs:
                raise bad(key, f"must be an integer ≥ block_size ({bs})")

    @property
    def enabled(self) -> bool:
        return bool(self.image)

    @property
    def resolved_state_dir(self) -> str:
        return self.state_dir or os.path.abspath(self.image) + ".colo"

    @property
    def nbd_uri(self) -> str:
        """The NBD URI clients use for this export (qemu, nbdinfo, libnbd all accept it)."""
        kind, where = parse_export_address(self.export)
        if kind == "unix":
            return f"nbd+unix:///?socket={where}"
        return f"nbd://{self.export}"
