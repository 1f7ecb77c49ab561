"""Drive a QEMU live migration of a RAM image over QMP (helper of bench_vs_qemu.py).

The source QEMU maps the image file as its guest RAM (``memory-backend-file``,
``share=on``) and never runs a guest instruction (``-S``); the destination maps its
own, empty file of the same size and waits with ``-incoming defer``. Both are
plain ``-machine pc`` (TCG: there is no KVM here, which does not matter since no
guest code runs). Migration runs over TCP on 127.0.0.1, with ``max-bandwidth``
raised (its default, 128 MiB/s, would be the limit otherwise) and optionally
``multifd``. Afterwards the destination's file is compared with the source image
by blake3: the guest RAM the migration moved is exactly that file.

Nothing outside the standard library and ``blake3`` is used; QMP is spoken directly
(newline-delimited JSON on a unix socket).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import blake3

QEMU = "qemu-system-x86_64"
PAGE = 4096


class QmpError(RuntimeError):
    pass


def file_blake3(path: str, chunk: int = 8 << 20) -> str:
    """blake3 of a whole file, read in chunks (multithreaded hashing where available)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO) if hasattr(blake3.blake3, "AUTO") \
        else blake3.blake3()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


class Qmp:
    """A minimal synchronous QMP client over a unix socket."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                break
            except OSError as exc:  # not listening yet
                s.close()
                last = exc
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {path}: cannot connect: {last}") from exc
                time.sleep(0.02)
        s.settimeout(timeout)
        self.sock = s
        self.file = s.makefile("rb")
        self.events: list[dict] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"QMP socket {path}: unexpected greeting {greeting!r}")
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise QmpError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name: str, **args) -> object:
        msg: dict = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(f"{name} {args}: {reply['error'].get('class')}: "
                               f"{reply['error'].get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


@dataclass
class QemuVM:
    """One QEMU process with its RAM in ``mem_path``."""

    name: str
    mem_path: str
    size_mb: int
    workdir: str
    incoming: bool = False
    extra: list[str] = field(default_factory=list)   # more QEMU arguments (TLS objects)
    proc: subprocess.Popen | None = None
    qmp: Qmp | None = None
    log_path: str = ""
    argv: list[str] = field(default_factory=list)

    def start(self) -> None:
        sock = os.path.join(self.workdir, f"{self.name}.qmp")
        self.log_path = os.path.join(self.workdir, f"{self.name}.log")
        self.argv = [
            QEMU, "-machine", "pc,memory-backend=mem",
            # prealloc=off is the default; stated so that nobody "fixes" it: prealloc
            # only touches pages (it does not clear them), but there is no reason to.
            "-object", f"memory-backend-file,id=mem,size={self.size_mb}M,"
                       f"mem-path={self.mem_path},share=on,prealloc=off",
            "-m", f"{self.size_mb}M",
            "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
            "-qmp", f"unix:{sock},server=on,wait=off",
        ]
        if self.incoming:
            self.argv += ["-incoming", "defer"]
        self.argv += self.extra
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.proc.poll() is not None:
                raise QmpError(f"{self.name}: QEMU exited with {self.proc.returncode}: "
                               f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise QmpError(f"{self.name}: QMP socket did not appear: {self.log_tail()}")
            time.sleep(0.02)
        self.qmp = Qmp(sock)

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace").strip()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


TLS_HOSTNAME = "localhost"


def make_tls_certs(directory: str) -> str:
    """A throwaway CA and a server and a client certificate signed by it, in the file
    names QEMU's tls-creds-x509 reads (ca-cert.pem, server-*.pem, client-*.pem), made with
    the openssl command. Returns ``directory``."""
    os.makedirs(directory, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
        "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=colo-bench-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for who, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        ext = os.path.join(directory, f"{who}.ext")
        with open(ext, "w") as f:
            f.write(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,"
                    f"keyEncipherment\nextendedKeyUsage={usage}\n"
                    f"subjectAltName=DNS:{TLS_HOSTNAME},IP:127.0.0.1\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}-key.pem",
            "-out", f"{who}.csr", "-subj", f"/CN={TLS_HOSTNAME}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "2", "-extfile", ext)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrate_image(image_path: str, size_mb: int, *, multifd: bool = False, channels: int = 2,
                  max_bandwidth: int = 100 << 30, image_digest: str | None = None,
                  poll_s: float = 0.005, timeout_s: float = 600.0,
                  dest_dir: str = "/dev/shm", tls: bool = False) -> dict:
    """Migrate the guest RAM held in ``image_path`` (``size_mb`` MiB) from one QEMU to
    another on this machine; return figures from query-migrate plus checks.

    The image file is used in place as the source's RAM (QEMU does not write it
    at start: checked here by hashing it after the source is up); the destination
    gets a fresh, empty file in ``dest_dir`` which is removed before returning.
    ``tls``: the migration runs over TLS (tls-creds-x509, certificates made here, the
    destination checks the source's client certificate and the source the server's).
    """
    if image_digest is None:
        image_digest = file_blake3(image_path)
    workdir = tempfile.mkdtemp(prefix="colo-bench-qemu-")
    dst_mem = os.path.join(dest_dir, f"colo-bench-qemu-dst-{os.getpid()}-{int(multifd)}")
    src_extra: list[str] = []
    dst_extra: list[str] = []
    if tls:
        certs = make_tls_certs(os.path.join(workdir, "tls"))
        src_extra = ["-object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client,"
                                "verify-peer=on"]
        dst_extra = ["-object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=server,"
                                "verify-peer=on"]
    src = QemuVM("src", image_path, size_mb, workdir, extra=src_extra)
    dst = QemuVM("dst", dst_mem, size_mb, workdir, incoming=True, extra=dst_extra)
    result: dict = {"mode": ("multifd" if multifd else "plain") + ("+tls" if tls else ""),
                    "channels": channels if multifd else 1, "tls": tls}
    try:
        with open(dst_mem, "wb") as f:  # empty (all-zero, sparse) destination RAM
            f.truncate(size_mb << 20)
        src.start()
        dst.start()
        # QEMU must not have touched the image while starting (ROMs/BIOS are their
        # own RAM blocks, not in this file; -S: no guest code runs).
        after_start = file_blake3(image_path)
        result["source_untouched_at_start"] = after_start == image_digest
        if after_start != image_digest:
            raise QmpError("the source QEMU changed its RAM file at start; "
                           "the comparison would not move the same bytes")
        caps = [{"capability": "multifd", "state": bool(multifd)}]
        for vm in (src, dst):
            vm.qmp.cmd("migrate-set-capabilities", capabilities=caps)
        params = {"max-bandwidth": int(max_bandwidth)}
        if multifd:
            params["multifd-channels"] = int(channels)
        if tls:
            params["tls-creds"] = "tls0"
            params["tls-hostname"] = TLS_HOSTNAME
        src.qmp.cmd("migrate-set-parameters", **params)
        dst_params: dict = {}
        if multifd:
            dst_params["multifd-channels"] = int(channels)
        if tls:
            dst_params["tls-creds"] = "tls0"
        if dst_params:
            dst.qmp.cmd("migrate-set-parameters", **dst_params)
        got = src.qmp.cmd("query-migrate-parameters")
        result["max_bandwidth"] = got.get("max-bandwidth")
        if multifd:
            result["multifd_channels"] = got.get("multifd-channels")
        port = free_port()
        uri = f"tcp:127.0.0.1:{port}"
        dst.qmp.cmd("migrate-incoming", uri=uri)
        t0 = time.perf_counter()
        src.qmp.cmd("migrate", uri=uri)
        src_done = dst_done = None
        info: dict = {}
        deadline = time.monotonic() + timeout_s
        while src_done is None or dst_done is None:
            if src_done is None:
                info = src.qmp.cmd("query-migrate")
                st = info.get("status")
                if st == "completed":
                    src_done = time.perf_counter()
                elif st in ("failed", "cancelled"):
                    raise QmpError(f"source migration {st}: {info.get('error-desc', info)}"
                                   f"; dst log: {dst.log_tail()}")
            if dst_done is None:
                dinfo = dst.qmp.cmd("query-migrate")
                st = dinfo.get("status")
                if st == "completed":
                    dst_done = time.perf_counter()
                elif st in ("failed", "cancelled"):
                    raise QmpError(f"destination migration {st}: {dinfo}; "
                                   f"log: {dst.log_tail()}")
            if time.monotonic() > deadline:
                raise QmpError(f"migration did not complete in {timeout_s}s: {info}")
            if src_done is None or dst_done is None:
                time.sleep(poll_s)
        ram = info.get("ram", {})
        result.update({
            "total_time_ms": info.get("total-time"),
            "setup_time_ms": info.get("setup-time"),
            "downtime_ms": info.get("downtime"),
            "wall_to_src_completed_s": src_done - t0,
            "wall_to_dst_completed_s": dst_done - t0,
            "ram_transferred": ram.get("transferred"),
            "ram_total": ram.get("total"),
            "ram_normal_pages": ram.get("normal"),
            "ram_normal_bytes": ram.get("normal-bytes"),
            "ram_duplicate_pages": ram.get("duplicate"),
            "ram_multifd_bytes": ram.get("multifd-bytes"),
            "ram_precopy_bytes": ram.get("precopy-bytes"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "qemu_mbps": ram.get("mbps"),
        })
        # the destination's RAM file must now hold exactly the image
        result["dst_blake3"] = file_blake3(dst_mem)
        result["dst_equal"] = result["dst_blake3"] == image_digest
        result["source_untouched_after"] = file_blake3(image_path) == image_digest
        return result
    finally:
        dst.stop()
        src.stop()
        for p in (dst_mem,):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        shutil.rmtree(workdir, ignore_errors=True)
