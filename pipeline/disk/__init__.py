"""Disk replication over NBD: the exports, write forwarding, the secondary's store with
its commit journal, and the disk comparator. The stage process is pipeline.stages.disk.

Data flow::

    PVM ──NBD──► primary export (nbd_server + primary.PrimaryLink)
                   │ order: epoch + seq under the lock set_epoch takes in the pause
                   │ pwrite into the primary image (overlapping writes in seq order)
                   │ FORWARD {epoch, seq, offset, length, blake3} + data   (wire.py)
                   │ SEAL {epoch, last seq} when the pause moves the epoch on
                   ▼ ZeroMQ DEALER ─tcp─► ROUTER (secondary.ForwardReceiver)
                                            │ validate; append to buffer-<epoch>.log
                                            │ compare (comparator.py); ACK
                   ◄────────────────────────┘
                   reply to the PVM only now (or EIO after forward_timeout_ms)

    SVM ──NBD──► secondary export (nbd_server + secondary.SvmLink)
                   reads: overlay blocks, else the image; writes: overlay (store.py)

    commit(e)  (coordinator, SVM paused): wait until every seq sealed into e arrived;
               apply buffer logs ≤ e to the image in (epoch, seq) order, journalled;
               drop the overlay.                          → image == primary at checkpoint e
    failover() (primary lost): merge the overlay into the image, journalled; the SVM then
               writes the image directly.

Initial sync (``disk.initial_sync``, on by default): at start the primary streams the
allocated extents of its image (SEEK_DATA/SEEK_HOLE; all-zero chunks without data) to
the secondary, which empties its image on the sync's BEGIN and writes the extents
straight into it; the journal says ``syncing`` until a commit whose seal covers the
sync's END. Sync chunks take seqs in the one write order, so guest writes go on and
are forwarded as usual meanwhile. The snapshot stage waits for the sync's END to be
ordered before a checkpoint's pause (``wait_synced``). Counters ``sync_total`` and
``sync_bytes`` show the progress in ``stats``.

Modules: settings (DiskSettings), counters (DiskCounters), nbd_protocol (wire constants),
nbd_server (the NBD server), image (a sparse file with pread/pwrite/punch), wire (the
forwarding messages), primary (PVM side), secondary (SVM side and the receiver), store
(image + overlay + buffer + journal), comparator.
"""
