"""Roles decided at run time (``node.role = "auto"``), and the role history.

With ``auto`` each host's config names itself (``node.listen``, where it listens while
it is the secondary) and its peer (``peer.address``, where the peer listens while *it*
is the secondary). Nothing in either file says who is primary, so both files stay valid
after any number of failovers:

* at start, :func:`decide_role` asks the witness: a node whose peer holds the active
  role becomes that peer's secondary; otherwise it runs as the primary (it takes the
  next generation of the role; if the peer wins that race it gives up and a restart
  makes it the secondary);
* a secondary that took over (``takeover.py``) becomes the primary around its running
  guest (``pipeline/supervisor.py``, ``Supervisor.become_primary``) and waits for a new
  secondary to protect its guest again.

:func:`effective_settings` turns the host's config into the settings of one role, in
the terms the rest of the code uses (``node.role`` primary or secondary, ``peer.address``
the address of whichever node is the secondary).

The role history is a list in the node info (``role_history``): each change with its
role, generation, wall time and cause; ``stats``, the node info and the metrics show it.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.failover.witness import make_witness, witness_vm
from pipeline.schema import SettingError

log = logging.getLogger(__name__)

HISTORY_MAX = 64      # role changes kept in the node info (the oldest go first)
GRACE_S = 2.0         # beyond the heartbeat timeout: how long a restarted node that held
                      # the role last leaves the peer to take it over (a guard poll, slack)


def check_auto(settings: Any) -> None:
    """The rules between sections for ``node.role = "auto"`` (SettingError names the key)."""
    n, f = settings.node, settings.failover
    if n.listen:
        _check_tcp("node.listen", n.listen)
    if n.role != "auto":
        if settings.net.redirector_by_node:
            raise SettingError("net.redirector_by_node", f"true with node.role {n.role!r}: "
                               "the node runs the redirector while it is the secondary of "
                               "its peer, which only role 'auto' names", "node.role 'auto'")
        return
    if not n.listen:
        raise SettingError("node.listen", "missing for node.role 'auto'",
                           "this host's own address, tcp://HOST:PORT")
    if n.listen == settings.peer.address:
        raise SettingError("node.listen", f"{n.listen!r} is peer.address too: with role "
                           "'auto', peer.address is the OTHER host's address",
                           "this host's own address")
    if f.witness == "none":
        raise SettingError("failover.witness", "'none' with node.role 'auto': the witness "
                           "is what says which node is active", "'etcd' (or 'local' for a "
                           "one-machine demo)")
    if not f.witness_key:
        raise SettingError("failover.witness_key", "missing for node.role 'auto'",
                           "the protected VM's name at the witness, the same on both hosts, "
                           "e.g. '/colo/vm1/active'")
    if settings.disk.enabled:
        from pipeline import wire
        default = type(settings.disk)().forward
        if settings.disk.forward != default:
            raise SettingError("disk.forward", f"{settings.disk.forward!r} with node.role "
                               "'auto': the disk's forwarding link follows the secondary's "
                               f"address (port + {wire.DISK_FORWARD_PORT_OFFSET})",
                               "not set")
        top = 65535 - wire.DISK_FORWARD_PORT_OFFSET
        for key, addr in (("node.listen", n.listen), ("peer.address", settings.peer.address)):
            if int(addr.rsplit(":", 1)[1]) > top:
                raise SettingError(key, f"{addr!r}: with a replicated disk the port + "
                                   f"{wire.DISK_FORWARD_PORT_OFFSET} is used too",
                                   f"a port up to {top}")
    if settings.heartbeat.address:
        raise SettingError("heartbeat.address", "set with node.role 'auto': the heartbeat "
                           "follows the secondary's address (port + 3)", "empty")
    net = settings.net
    from pipeline import wire
    if net.secondary_in and not net.secondary_in.startswith("unix:"):
        raise SettingError("net.secondary_in", f"{net.secondary_in!r} with node.role 'auto': "
                           "the SVM's output goes to whichever host is the primary, at its "
                           f"address's port + {wire.NET_SECONDARY_PORT_OFFSET}",
                           "not set (or a unix: path when both hosts are one machine)")
    if net.redirector_by_node:
        _check_redirector_by_node(settings)
    if net.primary_in:
        top = 65535 - wire.NET_SECONDARY_PORT_OFFSET
        for key, addr in (("node.listen", n.listen), ("peer.address", settings.peer.address)):
            if int(addr.rsplit(":", 1)[1]) > top:
                raise SettingError(key, f"{addr!r}: with a comparator (net.primary_in) the "
                                   f"port + {wire.NET_SECONDARY_PORT_OFFSET} is used too",
                                   f"a port up to {top}")


def _check_redirector_by_node(settings: Any) -> None:
    """``net.redirector_by_node``: everything the redirector's command line is made of."""
    net = settings.net
    for key, value, want in (
            ("net.redirector_in", net.redirector_in, "the redirector's --primary-in"),
            ("net.primary_in", net.primary_in if net.primary_in.startswith("packet:") else "",
             "packet:IFNAME, this host's guest NIC (the redirector's --svm)"),
            ("net.client_in", net.client_in if net.client_in.startswith("packet:") else "",
             "packet:IFNAME, the clients' network (the redirector's --uplink)"),
            ("net.secondary_out", net.secondary_out if net.secondary_out.startswith("tcp:")
             else "", "tcp:HOST:PORT (the peer's redirector connects to its port)"),
            ("failover.redirector_pid_file", settings.failover.redirector_pid_file,
             "a path: the node signals the redirector through it")):
        if not value:
            raise SettingError(key, "missing or not usable with net.redirector_by_node", want)


def redirector_command(settings: Any) -> list[str]:
    """The redirector's command line (``net.redirector_by_node``) on a host whose config
    (as the file says, role auto) is ``settings``: this host the secondary, its peer the
    primary whose comparator it serves."""
    import sys
    net, peer = settings.net, settings.peer.address
    peer_host = peer.removeprefix("tcp://").rsplit(":", 1)[0]
    mirror_port = net.secondary_out.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "pipeline.net.redirector",
           "--svm", net.primary_in.split(":", 1)[1], "--uplink", net.client_in.split(":", 1)[1],
           "--mirror-from", f"tcp:{peer_host}:{mirror_port}",
           "--compare-to", net_secondary_address(peer),
           "--primary-in", net.redirector_in, "--primary-out", net.redirector_out,
           "--pid-file", settings.failover.redirector_pid_file]
    if net.redirector_offsets:
        cmd += ["--offsets-out", net.redirector_offsets, "--offsets-in", net.redirector_offsets]
    if net.redirector_control:
        cmd += ["--control", net.redirector_control]
    return cmd


def _check_tcp(key: str, addr: str) -> None:
    from pipeline import wire
    host, _, port = addr[6:].rpartition(":") if addr.startswith("tcp://") else ("", "", "")
    top = 65535 - max(wire.CHANNEL_PORT_OFFSETS.values())
    if not host or not port.isdigit() or not 1 <= int(port) <= top:
        raise SettingError(key, f"{addr!r} is not a tcp address with a host and a port "
                           f"from 1 to {top}", "tcp://HOST:PORT")


def effective_settings(settings: Any, role: str) -> Any:
    """The settings of this host in ``role`` ("primary" or "secondary"): for ``auto``,
    ``peer.address`` becomes the secondary's address (our own ``node.listen`` while we
    are the secondary, the peer's while we are the primary)."""
    if settings.node.role != "auto":
        return settings
    if role not in ("primary", "secondary"):
        raise ValueError(f"role {role!r} is neither 'primary' nor 'secondary'")
    peer = dataclasses.replace(settings.peer, address=settings.node.listen
                               if role == "secondary" else settings.peer.address)
    disk = settings.disk
    if disk.enabled:   # the secondary binds its forwarding link, the primary connects to it
        disk = dataclasses.replace(disk, forward=disk_forward_address(peer.address))
    net = settings.net
    if net.primary_in and not net.secondary_in:
        # the primary's comparator listens for the SVM's output on its own address
        primary = settings.node.listen if role == "primary" else settings.peer.address
        net = dataclasses.replace(net, secondary_in=net_secondary_address(primary))
    return dataclasses.replace(settings, node=dataclasses.replace(settings.node, role=role),
                               peer=peer, disk=disk, net=net)


def survivor_settings(settings: Any) -> Any:
    """The primary's settings of a survivor of a takeover (``Supervisor.become_primary``).
    A real guest NIC behind this host's redirector (``net.redirector_in``): since the
    takeover the redirector holds the guest's interface and goes on holding it, so the
    comparator takes the guest's frames from the redirector's streams, not from the
    interface named in ``net.primary_in``; the clients' side (``client_in``, ``outdev``)
    and the secondary's stay as configured."""
    s = effective_settings(settings, "primary")
    net = s.net
    if not net.redirector_in:
        return s
    return dataclasses.replace(s, net=dataclasses.replace(
        net, primary_in=net.redirector_in, primary_out=net.redirector_out))


def net_secondary_address(primary_address: str) -> str:
    """Role auto: where the primary's comparator takes the SVM's output frames
    (``tcp://HOST:PORT`` -> ``tcp:HOST:PORT+5``, the comparator's address form)."""
    from pipeline import wire
    base, port = primary_address.rsplit(":", 1)
    return f"tcp:{base.removeprefix('tcp://')}:{int(port) + wire.NET_SECONDARY_PORT_OFFSET}"


def disk_forward_address(secondary_address: str) -> str:
    """Role auto: where the secondary's disk stage takes the forwarded writes."""
    from pipeline import wire
    base, port = secondary_address.rsplit(":", 1)
    return f"{base}:{int(port) + wire.DISK_FORWARD_PORT_OFFSET}"


def decide_role(settings: Any, poll_s: float = 0.2, wait: bool = True) -> tuple[str, str]:
    """(role, why) for this start. Fixed roles are what the config says; ``auto`` asks
    the witness who holds the active role.

    This node was the last to be granted the role (it restarts after a crash, its old
    lease may still run): its guest starts afresh, so the peer's SVM, if it runs, is the
    one to keep. It waits until its old claim lapsed and then for the peer to take over
    (the peer's heartbeat timeout and a poll of the witness, ``GRACE_S``), and runs as
    primary only if nobody did. ``wait=False`` (check-config): one look, no waiting."""
    if settings.node.role != "auto":
        return settings.node.role, "node.role in the config"
    witness = make_witness(settings.failover, witness_vm(settings))
    me = settings.node.name
    grace = settings.heartbeat.timeout_s + GRACE_S
    deadline = time.monotonic() + witness.ttl_s + 2 + grace
    free_since: float | None = None
    try:
        while True:
            holder, last = witness.holder(), witness.last_grant()
            if holder is not None and holder["node"] != me:
                return "secondary", (f"the peer {holder['node']!r} holds the active role "
                                     f"(generation {holder['generation']}) at {witness.where}")
            now = time.monotonic()
            if not wait and holder is not None:
                return "primary", (f"this node holds the active role (generation "
                                   f"{holder['generation']}) at {witness.where}: it runs as "
                                   "primary, or its last run's lease has not lapsed yet")
            if holder is None and (last is None or last["node"] != me):
                return "primary", (f"nobody holds the active role at {witness.where} (last "
                                   f"granted: {last}): this node runs the guest as primary")
            if holder is None and not wait:
                return "primary", (f"nobody holds the active role at {witness.where}; this "
                                   f"node held it last ({last}): after waiting {grace:.1f} s "
                                   "for the peer to take it over")
            if holder is None:
                free_since = free_since or now
                if now - free_since >= grace:
                    return "primary", (f"this node held the active role last (generation "
                                       f"{last['generation']}) and the peer did not take it "
                                       f"over within {grace:.1f} s at {witness.where}")
            if now > deadline:
                return "primary", (f"this node's earlier claim {holder} at {witness.where} "
                                   "did not lapse; running as primary")
            time.sleep(poll_s)
    finally:
        witness.close()


# -- the role history ---------------------------------------------------------------------
def record_role(info: Callable[..., None], current: dict, role: str, generation: int,
                cause: str, **extra: Any) -> None:
    """Append one change to the node info's ``role_history`` (through ``info(**kw)``,
    the node info's writer; ``current`` is the node info as it is now)."""
    entry = {"role": role, "generation": int(generation), "at": round(time.time(), 3),
             "cause": cause, **extra}
    history = list(current.get("role_history", []))[-(HISTORY_MAX - 1):] + [entry]
    info(role_history=history, role_changes=int(current.get("role_changes", 0)) + 1)
    log.info("event=role role=%s generation=%d cause=%s", role, generation, cause)
