"""Settings of the replicated disk (the ``[disk]`` table of a node's config).

One frozen dataclass for both sides: the primary uses ``forward`` as the address
it connects to, the secondary as the address it binds. Written in the one style of
:mod:`pipeline.schema`: limits in the fields' metadata, checked on construction; a bad
value raises ``SettingError`` naming the key, so the config loader can add the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.schema import Section, SettingError
from pipeline.schema import setting as _f

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
class DiskSettings(Section):
    """The ``[disk]`` table. ``image`` empty (the default): no replicated disk."""

    SECTION = "disk"
    image: str = _f("", (
        "The disk image this host serves (primary: the PVM's disk; secondary: the image "
        'as of the last checkpoint). Created sparse at ``export_size`` if missing.'))
    export_size: int = _f(0, (
        'Bytes the NBD export reports; a multiple of ``block_size``.'), min=0,
        rule="a multiple of disk.block_size (0 only without a disk)")
    block_size: int = _f(4096, (
        "NBD minimum/preferred block size and the overlay's granularity (power of two, "
        '512..64 KiB).'), min=512, max=65536, rule="a power of two")
    max_request: int = _f(NBD_MAX_REQUEST, (
        'Largest single NBD request accepted (bytes, multiple of block_size, ≤ 32 MiB).'),
        min=512, max=NBD_MAX_REQUEST, rule="a multiple of disk.block_size")
    export: str = _f("127.0.0.1:10809", (
        'Where the NBD export listens: ``HOST:PORT`` or ``unix:PATH``.'),
        rule="HOST:PORT or unix:PATH")
    forward: str = _f("tcp://127.0.0.1:10810", (
        'ZeroMQ address of the write forwarding link (primary connects, secondary binds). '
        'Role ``auto``: leave it unset; the link follows the secondary\'s address, port + 4.'),
        rule="tcp://... or ipc://...")
    forward_window: int = _f(64, (
        'Forwarded writes in flight per NBD connection before the primary stops reading '
        'new requests (back-pressure on the guest when the secondary is slow).'), min=1, max=4096)
    forward_timeout_ms: int = _f(10_000, (
        "How long the primary waits for the secondary's ack of a write. Past it the "
        "guest's write succeeds from the primary's image alone (counted in "
        "forward_errors); the secondary cannot commit that write's epoch without it, so "
        'it ends stale unless the write reaches it late.'), min=1)
    compare: str = _f("checkpoint", (
        '``"off"``: never compare write streams (the secondary does not hash the '
        "forwarded writes either: less CPU per written byte); "
        '``"checkpoint"``: a divergence requests one.'), choices=COMPARE_MODES)
    compare_timeout_ms: int = _f(2000, (
        'An unmatched write older than this counts as a divergence (secondary side).'), min=1)
    state_dir: str = _f("", (
        'Directory of the overlay, the PVM write buffer and the commit journal '
        '(secondary); empty = ``<image>.colo/`` next to the image.'))
    overlay_max_bytes: int = _f(4 * 1024**3, (
        'SVM overlay ceiling. At half of it the secondary asks for a checkpoint (which '
        'empties the overlay), and again once past it; an SVM write beyond it still '
        'succeeds (counted in overlay_over_bound): only the file system can fail it.'),
        min=512, rule="at least disk.block_size")
    buffer_max_bytes: int = _f(4 * 1024**3, (
        'Buffered-but-uncommitted PVM write ceiling (secondary). At half of it the '
        'secondary asks for a checkpoint; a forwarded write beyond it still succeeds for the '
        'guest, but the secondary gives the replication up: it stops as stale at its next '
        'commit, the primary runs on unprotected, and a new disk sync fills it when it '
        'rejoins.'), min=512, rule="at least disk.block_size")
    durable_commit: bool = _f(True, (
        'Secondary: fsync buffer logs, image and journal at every commit (survives a '
        'power loss of the secondary host). false: survives a killed stage process only — '
        'a lost secondary host is replaced by a full resync in COLO anyway — and commits '
        'are cheaper.'))
    initial_sync: bool = _f(True, (
        "Primary: at start, stream the image's allocated extents to the secondary, which "
        'empties its own image first (its journal says ``syncing`` until the first '
        'checkpoint that holds them all); guest writes go on meanwhile. false: the two '
        'images were made identical by hand.'))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image == "" and self.export_size == 0:
            return                     # no [disk] table: no replicated disk

        if not self.image:
            raise SettingError("disk.image", "empty while disk.export_size is set",
                               "a path (the export needs an image)")
        bs = self.block_size
        if bs & (bs - 1):
            raise SettingError("disk.block_size", f"{bs} is not a power of two",
                               "a power of two, 512 to 65536")
        if self.export_size <= 0 or self.export_size % bs:
            raise SettingError("disk.export_size", f"{self.export_size} is not a positive "
                               "multiple of block_size", f"a positive multiple of {bs}")
        if self.max_request < bs or self.max_request % bs:
            raise SettingError("disk.max_request", f"{self.max_request} is not a multiple of "
                               "block_size", f"a multiple of {bs} up to {NBD_MAX_REQUEST}")
        try:
            parse_export_address(self.export)
        except ValueError as e:
            raise SettingError("disk.export", f"{self.export!r} is not an export address ({e})",
                               "HOST:PORT or unix:PATH") from None
        if not self.forward.startswith(("tcp://", "ipc://")):
            raise SettingError("disk.forward", f"{self.forward!r} is not a ZeroMQ address",
                               "tcp://... or ipc://...")
        if self.overlay_max_bytes < bs:
            raise SettingError("disk.overlay_max_bytes", f"{self.overlay_max_bytes} is below "
                               "block_size", f"at least {bs}")
        if self.buffer_max_bytes < bs:
            raise SettingError("disk.buffer_max_bytes", f"{self.buffer_max_bytes} is below "
                               "block_size", f"at least {bs}")

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
