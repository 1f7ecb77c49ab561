"""The carried TCP sequence offsets of a real guest NIC, from a survivor to its new
secondary (``net.redirector_offsets``; docs/deployment.md, "After a failover").

A survivor's guest goes on in its own (the old SVM's) sequence space on every connection
the clients opened before the failover; its redirector moves those connections' segments
into the clients' space and, at the re-protection, writes their offsets to
``net.redirector_offsets`` (``--offsets-out``). A new secondary's SVM, synced from that
guest, is in the same space, so its redirector needs the same offsets: the primary
coordinator sends the file's rows after each secondary's HELLO (``wire.NET_OFFSETS``,
before the full sync) and the secondary coordinator writes them to its own
``net.redirector_offsets`` and tells its redirector to load them (SIGHUP to
``failover.redirector_pid_file``; the redirector reads its ``--offsets-in``).
"""
from __future__ import annotations

import json
import os
import signal
import socket
from typing import Any

from pipeline.failover.takeover import signal_redirector
from pipeline.net.rewriter import SeqRewriter


def carried_offsets(path: str) -> tuple[list[dict] | None, str]:
    """(rows, what) of this host's offsets file; rows None when there is nothing to send
    (no file configured, or none written: a guest that never failed over here has no
    connection moved). ValueError naming the file when it cannot be read or is not a
    list of rows (never sent)."""
    if not path:
        return None, "no net.redirector_offsets"
    try:
        with open(path) as fh:
            rows = json.load(fh)
    except FileNotFoundError:
        return None, f"no carried offsets at {path} (the guest never failed over here)"
    except (OSError, ValueError) as exc:
        raise ValueError(f"the carried offsets at {path} cannot be read: {exc}") from None
    if not isinstance(rows, list):
        raise ValueError(f"the carried offsets at {path} are not a JSON list of rows")
    return rows, f"{len(rows)} connections' offsets from {path}"


def take_carried_offsets(settings: Any, rows: list[dict]) -> str:
    """The secondary: the primary's rows into this host's ``net.redirector_offsets``
    (whole, or not at all), then SIGHUP to the redirector so it loads them. Returns what
    happened (for the node info and the log); ValueError naming the row or the missing
    setting when nothing was written."""
    path = settings.net.redirector_offsets
    if not path:
        raise ValueError(f"the primary sent {len(rows)} connections' offsets but "
                         "net.redirector_offsets is not set: this host's redirector "
                         "cannot get them")
    SeqRewriter().load_offsets(rows)            # all rows well formed, or ValueError
    with open(path + ".tmp", "w") as fh:
        json.dump(rows, fh)
    os.replace(path + ".tmp", path)              # whole, or not there
    what = f"{len(rows)} connections' offsets written to {path}"
    pid_file = settings.failover.redirector_pid_file
    if not pid_file:
        return what + "; no failover.redirector_pid_file: the redirector must load them itself"
    ok, why = signal_redirector(pid_file, signal.SIGHUP)
    return f"{what}; {why}" if ok else f"{what}; the redirector was not told: {why}"


class CheckpointNotice:
    """The secondary coordinator's side of the redirector's ``--control`` socket
    (``net.redirector_control``): after each applied or rolled-back epoch, the SVM still
    paused, ``checkpoint`` and the redirector's answer (it drops the offsets it learnt,
    keeps the carried ones). One connection, made again after a failure."""

    TIMEOUT_S = 1.0

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None

    def notify(self) -> str:
        """"" once the redirector answered ``ok``, else why not (the caller logs and
        counts it; the checkpoint stands)."""
        why = ""
        for _attempt in (0, 1):            # a redirector restarted since: connect again
            try:
                if self.sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(self.TIMEOUT_S)
                    self.sock = sock
                    sock.connect(self.path)
                self.sock.sendall(b"checkpoint\n")
                answer = b""
                while not answer.endswith(b"\n"):
                    chunk = self.sock.recv(256)
                    if not chunk:
                        raise ConnectionError("the redirector closed its control socket")
                    answer += chunk
            except OSError as exc:
                self.close()
                why = f"the redirector's control socket {self.path}: {exc}"
                continue
            if not answer.startswith(b"ok "):
                return f"the redirector answered {answer.strip()!r}"
            return ""
        return why

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
