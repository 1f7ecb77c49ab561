"""The hypervisor boundary. See :mod:`pipeline.xen_io.base` for the interface.

Backends are imported lazily so that a host without Xen libraries can still run
the sim backend, and the pipeline never imports a backend module directly.
"""
from __future__ import annotations

from .base import Domain, DomainError

__all__ = ["Domain", "DomainError", "BACKENDS"]

#: backend name -> "module:factory"; each factory takes keyword settings and returns a Domain
BACKENDS = {
    "sim": "pipeline.xen_io.sim.domain:open_sim_domain",
    "xen": "pipeline.xen_io.xen:open_xen_domain",
}
