"""Which pages differ when the memory proof fails (LocalPair turns it on: tests, the demo).

The proof (a FLAG_DIGEST checkpoint) compares one blake3 of all of each guest's memory:
it says whether the two memories differ, not where. With ``COLO_PROOF_PAGES=<dir>`` in a
node's environment, each side also writes the blake3 of every page at the proof, its guest
paused: the PVM's in the snapshot stage (``<dir>/pvm-<epoch>.npy``), the SVM's in the
restore stage after the apply (``svm-<epoch>.npy``). :func:`differing_pages` compares
them. (Session 8's one unequal proof after a re-protection, issue 11, could only be
explained by dumping both memories by hand.) Off when unset: one environment lookup at
import. Pages the hypervisor writes itself (Xen's vcpu_info) are not left out here.
"""
from __future__ import annotations

import os

import numpy as np

ENV = "COLO_PROOF_PAGES"
DIR = os.environ.get(ENV, "")
KEEP = 4    # proofs kept per side (a failed one is looked at right after it)


def record(domain, side: str, epoch: int, page_hashes) -> None:
    """The proof of ``epoch`` on ``side`` ("pvm" or "svm"): every page's blake3 into DIR
    (the guest paused). Nothing when COLO_PROOF_PAGES is unset. ``page_hashes(domain,
    pfns)`` is the stages' own hasher (``stages.common.domain_page_hashes``), passed in
    so this module, below the stages, does not import them."""
    if not DIR:
        return
    hashes = page_hashes(domain, np.arange(domain.page_count, dtype=np.uint64))
    tmp = os.path.join(DIR, f".{side}-{epoch}.npy")
    try:
        np.save(tmp, hashes)
        os.replace(tmp, path(DIR, side, epoch))    # whole, or not there
        # the newest KEEP of this side only (periodic proofs, checkpoint.verify_every)
        mine = sorted((int(n[len(side) + 1:-4]), n) for n in os.listdir(DIR)
                      if n.startswith(f"{side}-") and n.endswith(".npy"))
        for _, name in mine[:-KEEP]:
            os.unlink(os.path.join(DIR, name))
    except (OSError, ValueError):
        pass        # a diagnostic: never a reason for the stage to fail


def path(directory: str, side: str, epoch: int) -> str:
    return os.path.join(directory, f"{side}-{epoch}.npy")


def differing_pages(directory: str, epoch: int, limit: int = 20) -> dict:
    """The pages whose blake3 differs between the PVM's and the SVM's proof of ``epoch``:
    {"count", "first": up to ``limit`` pfns} (or {"missing": which file is not there})."""
    have = {}
    for side in ("pvm", "svm"):
        try:
            have[side] = np.load(path(directory, side, epoch))
        except OSError:
            return {"missing": path(directory, side, epoch)}
    if have["pvm"].shape != have["svm"].shape:
        return {"shapes": [have["pvm"].shape, have["svm"].shape]}
    diff = np.flatnonzero((have["pvm"] != have["svm"]).any(axis=1))
    return {"count": int(len(diff)), "first": [int(p) for p in diff[:limit]]}


def forget(directory: str, epoch: int) -> None:
    """Remove the proof files of ``epoch`` (kept only when the memories differed)."""
    for side in ("pvm", "svm"):
        try:
            os.unlink(path(directory, side, epoch))
        except OSError:
            pass
