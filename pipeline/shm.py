"""Named shared-memory segments with explicit ownership.

A segment is a file in ``/dev/shm`` mapped with ``mmap``. Exactly one process
owns it (the one that called :func:`create_segment`, normally the supervisor):
only the owner unlinks it. Every other user gets it by ``fork`` (inheriting the
owner's :class:`Segment`) or by :func:`attach_segment`, and only closes it.

We map ``/dev/shm`` directly instead of using ``multiprocessing.shared_memory``
because, in Python 3.11, ``SharedMemory`` registers every segment, including
attached ones, with ``multiprocessing.resource_tracker``, and the tracker
unlinks "leaked" segments when the attaching process exits. That would let a
``colo-pipeline stats`` process delete a running node's counters.

Every segment of a node is named ``colo-<node_name>-...`` so that a node, or a
test, can remove what a crashed run left behind (:func:`cleanup_segments`).
"""
from __future__ import annotations

import logging
import mmap
import os

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
NAME_MAX = 255
# madvise advice values (Linux >= 5.14); Python 3.11's mmap module does not name them
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23


def prefault_array(arr) -> bool:
    """Map the whole shared mapping behind ``arr`` (a numpy view made from a
    :class:`Segment`'s ``buf``, as the primary's tables are) into this process's page
    tables now, as :meth:`Segment.prefault` does for a segment in hand. An array that is
    not in an mmap (the secondary's own hash table) is left as it is: False."""
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or base.closed:
        return False
    return _populate(base, MADV_POPULATE_WRITE, "a shared array")


def _populate(mm: mmap.mmap, advice: int, what: str) -> bool:
    """``madvise(advice)`` on the whole of ``mm``; False where the kernel lacks
    MADV_POPULATE_* (the faults then simply happen on first use)."""
    try:
        mm.madvise(advice)
    except OSError as e:
        log.debug("%s: prefault not supported (%s)", what, e)
        return False
    return True


def segment_prefix(node_name: str) -> str:
    """The prefix every segment name of node ``node_name`` starts with."""
    _check_name(node_name, what="node name")
    return f"colo-{node_name}-"


def _check_name(name: str, what: str = "segment name") -> None:
    if not isinstance(name, str) or not name or "/" in name or "\0" in name \
            or name in (".", "..") or len(name) > NAME_MAX:
        raise ValueError(f"invalid {what} {name!r}: must be 1..{NAME_MAX} characters, "
                         "without '/' or NUL")


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


class Segment:
    """One mapped segment. ``close()`` for every user; ``unlink()`` for the owner only.

    Both are idempotent. ``unlink()`` refuses to run in any process other than
    the one that created the segment, so a forked stage cannot remove what the
    supervisor owns.
    """

    def __init__(self, name: str, size: int, mapping: mmap.mmap, owner_pid: int | None,
                 readonly: bool) -> None:
        self.name = name
        self.size = size
        self.readonly = readonly
        self._mmap: mmap.mmap | None = mapping
        #: pid of the creating process, or None for an attached segment
        self.owner_pid = owner_pid
        self._unlinked = False
        self.buf: memoryview = memoryview(mapping)
        if readonly:
            self.buf = self.buf.toreadonly()

    @property
    def closed(self) -> bool:
        return self._mmap is None

    @property
    def is_owner(self) -> bool:
        """True in the process that created the segment (not in forked children)."""
        return self.owner_pid == os.getpid()

    def prefault(self) -> bool:
        """Map every page into this process's page tables now, without touching the data.

        A forked stage otherwise takes one minor fault per page the first time it
        touches the segment (about 20-30 ms per 16 MiB here), which would land inside
        the first checkpoint's PVM pause. Returns False where the kernel lacks
        MADV_POPULATE_* (the faults then simply happen on first use).
        """
        if self._mmap is None:
            raise ValueError(f"segment {self.name!r} is closed in this process")
        return _populate(self._mmap, MADV_POPULATE_READ if self.readonly else
                         MADV_POPULATE_WRITE, f"segment {self.name}")

    def close(self) -> None:
        """Drop this process's mapping: it goes away at once if nothing else refers to it,
        else when the last view made from ``buf`` does.

        The mmap is not closed here, only this reference to it dropped. A numpy array made
        with ``np.ndarray(shape, dtype, seg.buf, offset)`` (ring slots, page buffers,
        counters) keeps the mmap object as its base but holds no buffer export on it, so
        ``mmap.close()`` succeeded under it and unmapped memory the array still pointed
        at: its next use was a SIGSEGV in numpy, with no traceback (issue 13). Nothing
        leaks in /dev/shm either way; only the owner's unlink matters."""
        if self._mmap is None:
            return
        self._mmap = None
        try:
            self.buf.release()
        except BufferError:     # a buffer exported from ``buf`` itself: it goes with it
            log.debug("segment %s: views still alive, unmapping deferred", self.name)

    def unlink(self) -> None:
        """Remove the segment's name from /dev/shm (owner only, once; later calls do nothing).
        Mappings stay valid until every user closes them."""
        if self._unlinked:
            return
        if self.owner_pid is None:
            raise PermissionError(f"segment {self.name!r} was attached, not created, by this "
                                  "process: only its owner may unlink it")
        if self.owner_pid != os.getpid():
            raise PermissionError(f"segment {self.name!r} is owned by pid {self.owner_pid}; "
                                  f"pid {os.getpid()} (a forked user) may only close it")
        self._unlinked = True
        try:
            os.unlink(_path(self.name))
        except FileNotFoundError:
            log.warning("segment %s was already removed by someone else", self.name)

    def __reduce__(self):  # pragma: no cover - guard, exercised via Ring/NodeCounters
        raise TypeError(f"segment {self.name!r} cannot be pickled: pass it to stage processes "
                        "by fork (multiprocessing.get_context('fork')), or attach by name")

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("owner" if self.is_owner else "user")
        return f"<Segment {self.name} {self.size} bytes {state}>"


def create_segment(name: str, size: int) -> Segment:
    """Create and map segment ``name`` of ``size`` bytes (zero-filled), owned by this process.

    A segment of the same name left over by a crashed run is removed first, with a
    warning. The space is reserved up front (``posix_fallocate``) so a full
    ``/dev/shm`` fails here with a clear error instead of a SIGBUS on first write.
    """
    _check_name(name)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"invalid size {size!r} for segment {name!r}: must be a positive int")
    path = _path(name)
    try:
        os.unlink(path)
        log.warning("removed stale shared-memory segment %s left over by an earlier run", path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            raise OSError(e.errno, f"cannot reserve {size} bytes for segment {name!r} in "
                                   f"{SHM_DIR}: {e.strerror}") from None
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return Segment(name, size, mapping, owner_pid=os.getpid(), readonly=False)


def attach_segment(name: str, readonly: bool = False) -> Segment:
    """Map an existing segment. The caller may only close it; nothing unlinks it on exit."""
    _check_name(name)
    path = _path(name)
    try:
        fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(f"no shared-memory segment {name!r} ({path} does not exist)") \
            from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise ValueError(f"segment {name!r} is empty (its creator has not sized it yet)")
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)
    return Segment(name, size, mapping, owner_pid=None, readonly=readonly)


def list_segments(prefix: str) -> list[str]:
    """Names of the segments in /dev/shm that start with ``prefix``, sorted."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def cleanup_segments(prefix: str) -> list[str]:
    """Remove every segment whose name starts with ``prefix`` (after a crash). Returns them.

    Refuses a prefix shorter than ``"colo-x-"`` so it can never sweep all of /dev/shm.
    """
    if not prefix.startswith("colo-") or len(prefix) < len("colo-x-"):
        raise ValueError(f"refusing to clean up segments with prefix {prefix!r}: "
                         "use segment_prefix(node_name)")
    removed = []
    for name in list_segments(prefix):
        try:
            os.unlink(_path(name))
            removed.append(name)
        except FileNotFoundError:
            pass
    if removed:
        log.warning("removed %d leftover shared-memory segment(s): %s", len(removed),
                    ", ".join(removed))
    return removed
