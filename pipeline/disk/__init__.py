"""Disk replication over NBD: the exports, write forwarding, the secondary's store with
its commit journal, and the disk comparator. The stage process is pipeline.stages.disk."""
