"""Who the comparator asks for checkpoints and hears commits from.

* :class:`XenNotify` — Xen's notify protocol on QEMU's ``notify_dev`` socket
  (u32 BE length + text): ``COLO_USERSPACE_PROXY_INIT`` is answered with
  ``COLO_COMPARE_GET_XEN_INIT``; the comparator sends ``DO_CHECKPOINT``; the
  toolstack's ``COLO_CHECKPOINT`` releases every held frame. This makes the
  comparator a drop-in for QEMU's colo-compare under ``xl remus -c``.
* :class:`CoordinatorControl` — our coordinator, via
  :class:`pipeline.checkpoint_api.CheckpointClient` (snapshot/committed/role events).
* :class:`NoControl` — nobody listens (like colo-compare without notify_dev):
  requests are only logged and counted.
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Protocol

from pipeline.net.adapters import StreamEndpoint
from pipeline.net.framing import Boundary

log = logging.getLogger(__name__)

PROXY_INIT = b"COLO_USERSPACE_PROXY_INIT"
PROXY_INIT_REPLY = b"COLO_COMPARE_GET_XEN_INIT"
DO_CHECKPOINT = b"DO_CHECKPOINT"
COLO_CHECKPOINT = b"COLO_CHECKPOINT"

#: notify messages are short strings; anything longer is garbage
MAX_NOTIFY_MESSAGE = 256


class Events(Protocol):
    """What a control reports to (the CompareLoop)."""

    def on_snapshot(self, epoch: int) -> None: ...

    def on_committed(self, epoch: int) -> None: ...

    def on_flush(self) -> None: ...

    def on_role(self, role: str) -> None: ...


def encode_notify(message: bytes) -> bytes:
    return struct.pack("!I", len(message)) + message


class NoControl:
    def pollable(self):
        return None

    def request(self, cause: str, detail: str) -> None:
        log.info("checkpoint wanted (%s: %s) but no notify_dev/coordinator is attached",
                 cause, detail)

    def handle(self, events: Events) -> None:
        pass

    def close(self) -> None:
        pass


class XenNotify:
    """Xen's/QEMU's notify channel on a listening stream endpoint."""

    def __init__(self, address: str, vnet_hdr: bool = False,
                 on_malformed: Callable[[str], None] | None = None) -> None:
        # like QEMU: with vnet_hdr_support the messages *to* us carry a vnet length word,
        # the ones we send do not
        self.endpoint = StreamEndpoint(address, vnet_hdr=False, name="notify_dev",
                                       on_malformed=on_malformed, max_frame=MAX_NOTIFY_MESSAGE,
                                       vnet_hdr_in=vnet_hdr)
        self.unknown_messages = 0

    def pollable(self):
        return self.endpoint

    def request(self, cause: str, detail: str) -> None:
        self.endpoint.send_raw(encode_notify(DO_CHECKPOINT))

    def handle(self, events: Events) -> None:
        for item in self.endpoint.recv():
            if isinstance(item, Boundary):
                # the framing's epoch-boundary word: it means nothing on notify_dev
                self.unknown_messages += 1
                log.warning("notify_dev: unsupported message (an epoch boundary record, "
                            "kind %d)", item.kind)
                continue
            message = item[0].rstrip(b"\0")
            if message == PROXY_INIT:
                self.endpoint.send_raw(encode_notify(PROXY_INIT_REPLY))
            elif message == COLO_CHECKPOINT:
                events.on_flush()
            else:
                self.unknown_messages += 1
                log.warning("notify_dev: unsupported message %r", message[:64])

    def close(self) -> None:
        self.endpoint.close()


class CoordinatorControl:
    """Our coordinator: requests through CheckpointClient, epochs from its events."""

    def __init__(self, client) -> None:   # client: pipeline.checkpoint_api.CheckpointClient
        self.client = client

    def pollable(self):
        return self.client.events_in

    def request(self, cause: str, detail: str) -> None:
        self.client.request(cause, detail)

    def handle(self, events: Events) -> None:
        for event in self.client.poll_events(0):
            if event.event == "snapshot":
                events.on_snapshot(event.epoch)
            elif event.event == "committed":
                events.on_committed(event.epoch)
            elif event.event == "role":
                events.on_role(str(event.extra.get("role")))

    def close(self) -> None:
        self.client.close()
