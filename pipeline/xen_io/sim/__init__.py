"""The ``sim`` backend: a simulated guest with simulated I/O (the demo's, the tests' and the
benchmarks' guest). Everything here is simulation; the Xen backend is ``xen_io/xen.py``.

- ``domain.py``: the guest process and :class:`SimDomain`, a
  :class:`~pipeline.xen_io.base.Domain` whose client inputs and outputs are simulated too;
- ``dirty_log.py``: its dirty log (userfaultfd write-protect + PAGEMAP_SCAN, or a bitmap);
- ``input_log.py``: the shared log of the inputs it consumes.
"""
from __future__ import annotations

from .domain import (ANSWER_SIZE, BLOB_SIZE, REPLY_CACHE_ENTRIES, SimDomain, WorkloadSpec,
                     answer_refused, open_sim_domain, parse_answer, request_input)

__all__ = ["ANSWER_SIZE", "BLOB_SIZE", "REPLY_CACHE_ENTRIES", "SimDomain", "WorkloadSpec",
           "answer_refused", "open_sim_domain", "parse_answer", "request_input"]
