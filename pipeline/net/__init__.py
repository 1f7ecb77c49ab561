"""The network comparator: packet parsing, connection tracking, comparison, TCP
sequence rewriting, and the frame adapters that feed it.

Modules, from the wire inwards:

* ``adapters``  — move frames, nothing else: QEMU's socket framing on
  ``tcp:``/``unix:`` (listen, one peer per role), AF_PACKET (``packet:IFNAME``),
  pcap files (``pcap:PATH``), and ``StreamClient`` for the other end.
* ``framing``   — QEMU's framing codec (u32 BE length [+ u32 BE vnet length] + frame).
* ``control``   — who hears checkpoint requests: Xen's notify protocol
  (``XenNotify``), our coordinator (``CoordinatorControl``), or nobody.
* ``loop``      — ``CompareLoop``: polls adapters and control, feeds the core,
  flushes sinks, runs the timeout scan. Used by the stage and the drop-in alike.
* ``packet`` / ``fragments`` — parse a frame into a connection key and the bytes
  that must agree; reassemble IPv4 fragments.
* ``comparator`` — ``Comparator``, the one object that holds frames, compares,
  releases and requests checkpoints (once per epoch).
* ``rewriter``  — the SVM's TCP sequence/ack rewriting (QEMU's filter-rewriter).
* ``mirror``    — client input to the SVM, held from snapshot to commit.
* ``settings``  — ``NetSettings`` (the ``[net]`` config table).
* ``standalone`` — ``colo-pipeline compare``, a drop-in for QEMU's colo-compare.
* ``build``     — frame builders and checksums (rewriter, demo, tests, benchmark).
* ``zmtp``      — ZeroMQ's PUSH/PULL wire protocol on a unix socket, both ends run by the
  calling thread: the client stage's ``client-inputs.sock``, the benchmark's client.
* ``qemu_peer`` — runs QEMU's colo-compare (or ours) as a reference process.

The stage process entry is :mod:`pipeline.stages.net_compare`.
"""
