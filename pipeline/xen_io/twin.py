"""Pairing on Xen: the twin method.

The secondary's domain must be the primary's guest, and Xen must hold the same event-channel
bindings for both (timer VIRQ, IPIs, console and xenstore channels). A copy made with
``xl save -c`` + ``xl restore -p`` never runs the guest's resume path and freezes after the
first checkpoint (docs/xen-lab.md, "Pairing: the twin method"). So both domains are restored
from one saved image and both run the resume path:

- primary host: ``colo-pipeline xen-twin save --config primary.toml`` saves the running
  ``guest.domain`` to ``guest.xen_image`` and restores it from there at once under its own name
  (``guest.xen_domain_config``): it is down for the save and the restore;
- the image goes to the secondary host (any file copy);
- secondary host: ``colo-pipeline xen-twin restore --config secondary.toml`` restores the
  image with the secondary's xl config (another name, same memory size and vCPUs).

The toolstack is Xen's ``xl``; every failure names the command and carries its output.
"""
from __future__ import annotations

import os
import shutil
import subprocess

from .base import DomainError


class TwinError(DomainError):
    """Making the twin failed; the message names the xl command and what it printed."""


def xl(*args: str, timeout: float = 600) -> str:
    """Run ``xl``; its output, or TwinError with the command and its output."""
    exe = shutil.which("xl") or next((p for p in ("/usr/sbin/xl", "/usr/lib/xen-4.17/bin/xl")
                                      if os.access(p, os.X_OK)), None)
    if exe is None:
        raise TwinError("xl not found: this host has no Xen toolstack (Debian: xen-utils)")
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise TwinError(f"xl {' '.join(args)} did not finish within {timeout:.0f} s") from exc
    if r.returncode:
        out = (r.stdout + r.stderr).strip()[-1500:]
        raise TwinError(f"xl {' '.join(args)} failed (exit {r.returncode}): {out}")
    return r.stdout


def domain_id(name: str) -> int | None:
    """The id of the domain named ``name``, or None when there is none."""
    try:
        return int(xl("domid", name).strip())
    except TwinError:
        return None


def restore(image: str, domain_config: str, domain: str) -> int:
    """``xl restore domain_config image``; the new domain must be named ``domain``."""
    for path, what in ((image, "saved image"), (domain_config, "xl domain config")):
        if not os.path.isfile(path):
            raise TwinError(f"{what} {path} does not exist")
    if domain_id(domain) is not None:
        raise TwinError(f"a domain named {domain!r} already exists: destroy it first "
                        f"(xl destroy {domain}) or name the twin differently")
    xl("restore", domain_config, image)
    domid = domain_id(domain)
    if domid is None:
        raise TwinError(f"xl restore {domain_config} {image} made no domain named {domain!r}: "
                        f"set name = \"{domain}\" in {domain_config}")
    return domid


def save_and_restore(domain: str, image: str, domain_config: str) -> int:
    """Save the running ``domain`` to ``image``, then restore it from there under the same
    name: the primary half of the twin. Returns the restored domain's id."""
    if domain_id(domain) is None:
        raise TwinError(f"no running domain named {domain!r} to save")
    os.makedirs(os.path.dirname(os.path.abspath(image)), exist_ok=True)
    xl("save", domain, image)
    return restore(image, domain_config, domain)
