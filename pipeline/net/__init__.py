"""The network comparator: packet parsing, connection tracking, comparison, TCP
sequence rewriting, and the frame adapters that feed it.

The core (:class:`pipeline.net.comparator.Comparator`) only sees frames as bytes
and has two outlets: ``release`` (a PVM frame may go to the client) and
``request`` (ask for a checkpoint). Adapters only move frames.
"""
