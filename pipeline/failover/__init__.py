"""Failover: who may be the active side, and how the secondary takes over.

- ``settings.py``: the ``[heartbeat]`` and ``[failover]`` sections of the node's config;
- ``witness.py``: witnesses that grant the active role to one node per generation
  (etcd for production, a lock file for the one-machine demo);
- ``guard.py``: the split-brain guard (witness, then fencing) a takeover must pass;
- ``takeover.py``: the role each coordinator holds, the secondary's takeover when the
  primary is lost, and what the active secondary serves.

The heartbeat itself is a stage (``pipeline/stages/heartbeat.py``); the checkpoint
protocol is ``pipeline/coordinator.py``, which calls into ``takeover.py``.
"""
