"""Witnesses: who grants the active role of a protected VM, to exactly one node per
generation (the split-brain guard's first half; the guard itself is
:mod:`pipeline.failover.guard`).

:class:`EtcdWitness` is the production one: an etcd cluster (Debian ``etcd-server``),
reached through the maintained ``etcd3gw`` client (etcd's v3 gRPC-gateway JSON API
over HTTP). Two keys per VM::

    /colo/<vm>/active      {"node": N, "generation": g}   attached to N's lease
    /colo/<vm>/generation  {"node": N, "generation": g}   the last grant, no lease

A grant is one etcd transaction that compares the mod revisions of both keys as they
were read, and then writes both: of two nodes racing, exactly one wins. A generation
is granted once, to one node; a higher one only while ``active`` is absent, i.e. after
its holder released it or its lease expired (the holder stopped renewing for
``lease_ttl_s``). The holder keeps its lease alive from a thread; when it cannot
renew, it counts the role as lost at the latest when etcd drops it (its local deadline
starts before the last successful renewal was sent), sets :attr:`Witness.lost` and
calls ``on_lost``: an active node that can no longer prove its role must stop
releasing output.

:class:`LocalWitness` is the same API on files (a compare-and-swap of numbered state
files): for the one-machine demo ONLY.
It protects nothing across hosts (both sides must see the same directory and the same
clock).
"""
from __future__ import annotations

import base64
import errno
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from pipeline import faults
from pipeline.failover.settings import FailoverSettings

log = logging.getLogger(__name__)


class WitnessError(RuntimeError):
    """The witness could not be asked (names the endpoint and the cause)."""


class RoleGone(WitnessError):
    """The witness answered: this node's lease expired or the key is no longer its claim."""


# -- witnesses ----------------------------------------------------------------------------
def _check_claim(node: str, generation: int) -> None:
    if not isinstance(node, str) or not node:
        raise ValueError(f"witness: node {node!r} must be a non-empty string")
    if type(generation) is not int or generation < 1:
        raise ValueError(f"witness: generation {generation!r} must be an integer >= 1")


def _record(raw: bytes | str | None, where: str) -> dict | None:
    """A witness value: {"node": str, "generation": int}, or None if absent."""
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
        if isinstance(rec, dict) and isinstance(rec.get("node"), str) \
                and type(rec.get("generation")) is int:
            return {"node": rec["node"], "generation": rec["generation"]}
    except (ValueError, TypeError):
        pass
    raise WitnessError(f"{where}: holds {raw!r}, not a witness record")


class Witness:
    """The part both witnesses share: the held role, its local deadline, the keepalive."""

    kind = "witness"

    def __init__(self, ttl_s: int, on_lost: Callable[[str], None] | None) -> None:
        if type(ttl_s) is not int or ttl_s < 2:
            raise ValueError(f"witness: lease TTL {ttl_s!r} must be an integer >= 2 (s)")
        self.ttl_s = ttl_s
        self.on_lost = on_lost
        self.lost = threading.Event()      # set when a held role could not be renewed
        self.lost_reason = ""
        self._lock = threading.RLock()
        self._claim: dict | None = None    # what this object holds
        self._valid_until = 0.0            # monotonic; the role is ours only before it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # the API -----------------------------------------------------------------------------
    @property
    def where(self) -> str:
        raise NotImplementedError

    @property
    def held(self) -> bool:
        """True while this object holds the role and its lease is surely still valid."""
        with self._lock:
            return self._claim is not None and time.monotonic() < self._valid_until

    def claim(self) -> dict | None:
        """What this object holds ({"node", "generation"}), or None."""
        with self._lock:
            return dict(self._claim) if self.held and self._claim else None

    def valid_until(self) -> float:
        """time.monotonic() until which the held role is surely valid (0 if none)."""
        with self._lock:
            return self._valid_until if self._claim is not None else 0.0

    def acquire(self, node: str, generation: int) -> bool:
        """True only if ``node`` now holds the active role for ``generation`` (granted now,
        or renewed: it held it already). Raises WitnessError if the witness is out of
        reach: never True on doubt."""
        _check_claim(node, generation)
        with self._lock:
            t0 = time.monotonic()
            ok = self._acquire(node, generation)
            if ok:
                self._claim = {"node": node, "generation": generation}
                self._valid_until = t0 + self.ttl_s
                self.lost.clear()
                self.lost_reason = ""
                self._start_keepalive()
                log.info("%s: %s holds the active role, generation %d", self.where, node,
                         generation)
            return ok

    def release(self) -> None:
        """Give the role back (the next generation can be granted at once)."""
        self._stop_keepalive()
        with self._lock:
            claim, self._claim, self._valid_until = self._claim, None, 0.0
            if claim is not None:
                self._release(claim)
                log.info("%s: %s released the active role, generation %d", self.where,
                         claim["node"], claim["generation"])

    def close(self) -> None:
        """Stop renewing without releasing (the lease runs out by itself)."""
        self._stop_keepalive()
        with self._lock:
            self._claim, self._valid_until = None, 0.0

    def holder(self) -> dict | None:
        raise NotImplementedError

    def last_generation(self) -> int:
        """The highest generation ever granted for this VM (0: none yet)."""
        grant = self.last_grant()
        return grant["generation"] if grant else 0

    def last_grant(self) -> dict | None:
        """The last grant ({"node", "generation"}), held or not; None if none yet."""
        raise NotImplementedError

    # to implement ------------------------------------------------------------------------
    def _acquire(self, node: str, generation: int) -> bool:
        raise NotImplementedError

    def _renew(self) -> None:
        """Extend the held lease; WitnessError if it cannot, or if the role is gone."""
        raise NotImplementedError

    def _release(self, claim: dict) -> None:
        raise NotImplementedError

    # keepalive ---------------------------------------------------------------------------
    def _start_keepalive(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._keepalive, name=f"{self.kind}-keepalive",
                                        daemon=True)
        self._thread.start()

    def _stop_keepalive(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(10)
        self._thread = None

    def _keepalive(self) -> None:
        period = self.ttl_s / 3
        retry = min(0.25, period)
        wait = period
        while not self._stop.wait(wait):
            with self._lock:
                if self._claim is None:
                    return
                t0 = time.monotonic()
                try:
                    self._renew()
                except RoleGone as exc:
                    self._lose(str(exc))
                    return
                except WitnessError as exc:
                    if time.monotonic() < self._valid_until:
                        log.warning("%s: cannot renew the lease yet: %s", self.where, exc)
                        wait = retry
                        continue
                    self._lose(f"lease not renewed for {self.ttl_s} s: {exc}")
                    return
                self._valid_until = t0 + self.ttl_s
                wait = period

    def _lose(self, reason: str) -> None:
        claim, self._claim, self._valid_until = self._claim, None, 0.0
        self.lost_reason = reason
        self.lost.set()
        log.error("%s: lost the active role (%s): %s", self.where, claim, reason)
        if self.on_lost is not None:
            try:
                self.on_lost(reason)
            except Exception:
                log.exception("%s: on_lost callback failed", self.where)


class EtcdWitness(Witness):
    """The active role of one VM in etcd: a lease + compare-and-swap (see module doc)."""

    kind = "etcd"

    def __init__(self, endpoints: tuple[str, ...] | list[str], key: str, ttl_s: int = 5, *,
                 request_timeout_s: float | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        super().__init__(ttl_s, on_lost)
        try:
            import etcd3gw  # noqa: F401 (the maintained client; `pip install etcd3gw`)
        except ImportError as exc:
            raise WitnessError(f"etcd witness: the etcd3gw package is missing ({exc})") \
                from None
        if not endpoints:
            raise ValueError("etcd witness: no endpoints")
        if not key.startswith("/"):
            raise ValueError(f"etcd witness: key {key!r} must start with '/'")
        self.endpoints = tuple(endpoints)
        self.key = key
        base = key.removesuffix("/active")
        self.gen_key = base + "/generation"
        # a request must come back in time for the keepalive to renew before the TTL
        self.request_timeout_s = request_timeout_s or min(2.0, ttl_s / 4)
        self._clients = [self._client(ep) for ep in self.endpoints]
        self._current = 0
        self._lease = None

    @property
    def where(self) -> str:
        return f"etcd witness {self.endpoints[self._current]} key {self.key}"

    def _client(self, url: str):
        import etcd3gw
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname or not u.port:
            raise ValueError(f"etcd witness: endpoint {url!r} is not http(s)://HOST:PORT")
        return etcd3gw.client(host=u.hostname, port=u.port, protocol=u.scheme,
                              timeout=self.request_timeout_s)

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)`` on the first endpoint that answers; WitnessError if none does."""
        from etcd3gw import exceptions as etcd_exc
        errors = []
        n = len(self._clients)
        for i in range(n):
            idx = (self._current + i) % n
            try:
                result = fn(self._clients[idx])
                self._current = idx
                return result
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as exc:
                errors.append(f"{self.endpoints[idx]}: {_cause(exc)}")
            except etcd_exc.Etcd3Exception as exc:
                errors.append(f"{self.endpoints[idx]}: {_cause(exc)}")
                break     # it answered, with an error: another member would say the same
            except (KeyError, ValueError, TypeError) as exc:
                errors.append(f"{self.endpoints[idx]}: unexpected answer ({exc!r})")
                break
        raise WitnessError(f"etcd witness ({self.key}): {what} failed: " + "; ".join(errors))

    def _get(self, key: str) -> tuple[dict | None, int, str]:
        """(record, mod_revision, lease id) of ``key``; (None, 0, "") if absent."""
        kvs = self._call(f"reading {key}", lambda c: c.get(key, metadata=True))
        if not kvs:
            return None, 0, ""
        value, meta = kvs[0]
        return (_record(value, f"etcd key {key}"), int(meta.get("mod_revision", 0)),
                str(meta.get("lease", "")))

    def holder(self) -> dict | None:
        return self._get(self.key)[0]

    def last_grant(self) -> dict | None:
        return self._get(self.gen_key)[0]

    def _grant_lease(self) -> Any:
        lease = self._call("granting a lease", lambda c: c.lease(self.ttl_s))
        return lease

    def _acquire(self, node: str, generation: int) -> bool:
        cur, cur_rev, cur_lease = self._get(self.key)
        last, last_rev, _ = self._get(self.gen_key)
        ours = self._lease is not None and cur_lease == str(self._lease.id)
        if cur is not None:
            if cur == {"node": node, "generation": generation} and ours:
                lease = self._lease
                return self._call("renewing the lease", lambda c: _keepalive(c, lease.id)) > 0
            if cur["node"] != node or generation < cur["generation"]:
                return False      # someone else holds it (or we ask for an old generation)
            # the same node: adopt its earlier claim or move to a higher generation
        elif last is not None and (generation < last["generation"] or (
                generation == last["generation"] and last["node"] != node)):
            return False          # that generation was granted already
        if self._lease is None or not ours:
            self._lease = self._grant_lease()
        value = json.dumps({"node": node, "generation": generation})
        txn = {
            "compare": [_cmp_mod(self.key, cur_rev), _cmp_mod(self.gen_key, last_rev)],
            "success": [{"request_put": {"key": _b64(self.key), "value": _b64(value),
                                         "lease": str(self._lease.id)}},
                        {"request_put": {"key": _b64(self.gen_key), "value": _b64(value)}}],
            "failure": [],
        }
        result = self._call("the compare-and-swap", lambda c: c.transaction(txn))
        if not result.get("succeeded", False):
            log.info("%s: %s lost the race for generation %d", self.where, node, generation)
            return False
        return True

    def _renew(self) -> None:
        lease = self._lease
        if lease is None:
            raise WitnessError(f"{self.where}: no lease")
        ttl = self._call("renewing the lease", lambda c: _keepalive(c, lease.id))
        if ttl <= 0:
            raise RoleGone(f"{self.where}: lease {lease.id} has expired")
        cur, _, cur_lease = self._get(self.key)
        if cur != self._claim or cur_lease != str(lease.id):
            raise RoleGone(f"{self.where}: the key now holds {cur} (lease {cur_lease}), "
                               f"not this node's claim")

    def _release(self, claim: dict) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        value = json.dumps(claim)
        txn = {"compare": [{"key": _b64(self.key), "result": "EQUAL", "target": "VALUE",
                            "value": _b64(value)}],
               "success": [{"request_delete_range": {"key": _b64(self.key)}}],
               "failure": []}
        self._call("releasing the role", lambda c: c.transaction(txn))
        self._call("revoking the lease",
                   lambda c: c.post(c.get_url("/kv/lease/revoke"), json={"ID": lease.id}))


def _keepalive(client: Any, lease_id: int) -> int:
    result = client.post(client.get_url("/lease/keepalive"), json={"ID": lease_id})
    return int(result.get("result", {}).get("TTL", -1))


def _cmp_mod(key: str, mod_revision: int) -> dict:
    return {"key": _b64(key), "result": "EQUAL", "target": "MOD",
            "mod_revision": str(mod_revision)}


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _cause(exc: BaseException) -> str:
    detail = getattr(exc, "detail_text", None)
    text = " ".join(str(p) for p in (type(exc).__name__, detail, *exc.args) if p)
    return text[:500]


class LocalWitness(Witness):
    """DEMO ONLY: the witness API on files, for two nodes on ONE machine. It cannot
    arbitrate between hosts (it knows nothing of a network partition); use
    :class:`EtcdWitness` for that.

    The state (the active claim: node, generation, lease token, expiry on
    CLOCK_MONOTONIC, holder pid; and the last grant) is a series of files
    ``<directory>/<name>.<n>.json``: the highest n is the state. A change is a
    compare-and-swap, as etcd's transaction is: the new state is written to a temporary
    file and hard-linked as n + 1, which fails if n + 1 exists (another process changed
    the state since this one read n); the loser reads again and decides again. So no
    process ever waits for another. (It was an fcntl lock around read-modify-write: a
    primary SIGSTOPped while holding it for its renewal's fsync left the secondary's
    takeover waiting on the lock until the primary was continued, 180 s in a fault-matrix
    run of ``sigstop-primary``. Now the stopped holder's claim simply expires, the
    secondary takes the next version, and the holder's renewal, when it resumes, finds
    that version taken and its role gone.) A claim expires after ``ttl_s`` without
    renewal, or at once when its holder process is gone.
    """

    kind = "local"
    KEEP_VERSIONS = 4     # older state files are removed (a reader that lost one reads again)

    def __init__(self, directory: str, key: str, ttl_s: int = 5, *,
                 on_lost: Callable[[str], None] | None = None) -> None:
        super().__init__(ttl_s, on_lost)
        name = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in key.strip("/"))
        if not name:
            raise ValueError(f"local witness: key {key!r} gives no file name")
        os.makedirs(directory, exist_ok=True)
        self.key = key
        self.directory, self._name = directory, name
        self._token = secrets.token_hex(8)

    @property
    def where(self) -> str:
        return f"local witness {os.path.join(self.directory, self._name)}.*.json (demo only)"

    @property
    def path(self) -> str:
        """The file of the current state (the newest version)."""
        versions = self._versions()
        return self._file(versions[-1] if versions else 0)

    def _file(self, version: int) -> str:
        return os.path.join(self.directory, f"{self._name}.{version}.json")

    def _versions(self) -> list[int]:
        prefix = self._name + "."
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            raise WitnessError(f"{self.where}: cannot list: {exc}") from None
        return sorted(int(n[len(prefix):-5]) for n in names
                      if n.startswith(prefix) and n.endswith(".json")
                      and n[len(prefix):-5].isdigit())

    def _read(self) -> tuple[int, dict]:
        """(version, state) of the newest state; a claim that is no longer alive reads as
        none."""
        for _ in range(20):
            versions = self._versions()
            if not versions:
                return 0, {"active": None, "last": None}
            try:
                with open(self._file(versions[-1]), encoding="utf-8") as fh:
                    state = json.load(fh)
            except FileNotFoundError:
                continue          # removed as old meanwhile: a newer version exists
            except (OSError, ValueError) as exc:
                raise WitnessError(f"{self.where}: cannot read version {versions[-1]}: "
                                   f"{exc}") from None
            active = state.get("active")
            if active is not None and not _claim_alive(active):
                state["active"] = None
            return versions[-1], state
        raise WitnessError(f"{self.where}: the state changed under 20 reads in a row")

    def _swap(self, version: int, state: dict) -> bool:
        """Write ``state`` as version + 1, unless another process wrote it first (False:
        read again). The file is complete (fsynced) before it is linked into place."""
        tmp = os.path.join(self.directory,
                           f".{self._name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(state, fh)
                fh.flush()
                os.fsync(fh.fileno())
            faults.point("witness.local.swap")
            try:
                os.link(tmp, self._file(version + 1))
            except FileExistsError:
                return False
        except OSError as exc:
            raise WitnessError(f"{self.where}: cannot write version {version + 1}: "
                               f"{exc}") from None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        for old in range(version + 1 - self.KEEP_VERSIONS, 0, -1):
            try:
                os.unlink(self._file(old))
            except FileNotFoundError:
                break             # removed up to here already
            except OSError:
                pass
        return True

    def _change(self, decide: Callable[[dict], dict | None]) -> dict | None:
        """Read-decide-swap until a swap wins. ``decide(state)``: the new state, or None
        to change nothing. Returns the state written, or None."""
        for _ in range(100):
            version, state = self._read()
            new = decide(state)
            if new is None or self._swap(version, new):
                return new
        raise WitnessError(f"{self.where}: lost 100 swaps in a row to other processes")

    def holder(self) -> dict | None:
        a = self._read()[1]["active"]
        return {"node": a["node"], "generation": a["generation"]} if a else None

    def last_grant(self) -> dict | None:
        last = self._read()[1]["last"]
        return {"node": last["node"], "generation": last["generation"]} if last else None

    def _acquire(self, node: str, generation: int) -> bool:
        def grant(state: dict) -> dict | None:
            cur, last = state["active"], state["last"]
            if cur is not None:
                if cur["node"] != node or generation < cur["generation"]:
                    return None
            elif last is not None and (generation < last["generation"] or (
                    generation == last["generation"] and last["node"] != node)):
                return None
            claim = {"node": node, "generation": generation}
            return {"active": dict(claim, token=self._token, pid=os.getpid(),
                                   pid_start=_start_time(os.getpid()),
                                   expires=time.monotonic() + self.ttl_s),
                    "last": claim}
        return self._change(grant) is not None

    def _renew(self) -> None:
        def extend(state: dict) -> dict:
            cur = state["active"]
            if cur is None or cur.get("token") != self._token:
                raise RoleGone(f"{self.where}: the role is no longer this node's "
                               f"(now {cur and {k: cur[k] for k in ('node', 'generation')}})")
            cur["expires"] = time.monotonic() + self.ttl_s
            cur["pid"], cur["pid_start"] = os.getpid(), _start_time(os.getpid())
            return state
        self._change(extend)

    def _release(self, claim: dict) -> None:
        def drop(state: dict) -> dict | None:
            cur = state["active"]
            if cur is None or cur.get("token") != self._token:
                return None
            state["active"] = None
            return state
        self._change(drop)


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _is_zombie(pid: int) -> bool:
    """A killed process stays a zombie until its (re)parent reaps it; it holds nothing."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _claim_alive(active: dict) -> bool:
    if time.monotonic() >= float(active.get("expires", 0)):
        return False
    pid = int(active.get("pid", 0))
    if _is_zombie(pid):
        return False
    try:
        os.kill(pid, 0)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
    return _start_time(pid) == int(active.get("pid_start", 0)) or not active.get("pid_start")


def witness_vm(settings: Any) -> str:
    """The name both nodes of a pair use for their VM at the witness."""
    return settings.failover.witness_key or f"colo-{settings.peer.address.rsplit(':', 1)[1]}"


def make_witness(settings: FailoverSettings, vm: str,
                 on_lost: Callable[[str], None] | None = None) -> Witness | None:
    """The witness ``settings`` name for VM ``vm`` (None for witness = "none")."""
    key = settings.witness_key or f"/colo/{vm}/active"
    if settings.witness == "etcd":
        return EtcdWitness(settings.etcd_endpoints, key, settings.lease_ttl_s, on_lost=on_lost)
    if settings.witness == "local":
        return LocalWitness(settings.witness_dir, key, settings.lease_ttl_s, on_lost=on_lost)
    return None
